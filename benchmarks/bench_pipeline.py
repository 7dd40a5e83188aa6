"""Streaming-pipeline benchmarks: efficiency (streamed ÷ bare), rate tests, per-frame CPU, stitcher choices.

    python benchmarks/bench_pipeline.py --model default --batch 32 --frames 1024        # everything
    python benchmarks/bench_pipeline.py --only stitch                                     # stitcher only
    python benchmarks/bench_pipeline.py --only rates --model tiny --batch 16 --json

Cases:
  efficiency  bare backend (submit/wait loop on one preprocessed batch) vs the whole service at max rate,
              interleaved rounds; median of per-round ratios, best-vs-best and the CPU-time ratio; stage
              latencies with the source paced at 60 % and 90 % of bare throughput.
  rates       90 % of bare (paced, backpressure): zero lost, every frame id published exactly once;
              150 % (free-running ring): exact drop accounting, latency bounded by the ring;
              a stalled subscriber (never reads, HWM) at max rate: the pipeline keeps its throughput.
  cpu         thread CPU time per frame of every stage (robust against other load on a shared machine).
  nice        helper-thread niceness 0 / 5 / 10 (serve's `nice`): efficiency and overhead p99 at 60 % load.
  switch      GIL switch interval while streaming (serve's `switch_interval_ms`): the interpreter's 5 ms
              against shorter ones, interleaved per round: efficiency, backend idle time between batches,
              overhead p99 at 60 % load.
  stitch      lsq vs greedy offsets on noisy patches with random offsets; Fourier vs rounded sub-pixel
              placement of true patches; live stitcher cost per patch; offline stitch time for 1000 patches.
  stitch-cnn  the same choices on the model's own patches of simulated scans, scored against the truth.
  quality     the quality stage (forward residual) at quality.every = off / 16 / 4 / 1 on a simulated
              siemens-star with its probe, no publisher, interleaved rounds: its thread CPU per frame and
              the service's throughput.
Wall-clock figures on a shared machine are noisy: compare ratios and repeat.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from edgeptycho.commands.bench import Bench, _lat


def efficiency(b: Bench, repeats: int) -> dict:
    b.bare(0.5)
    bare, streamed, ratios, cpu, cpu_ratios, bare_cpu, stream_cpu = [], [], [], [], [], [], []
    for _ in range(repeats):
        bare.append(b.bare())
        rep = b.streamed()
        streamed.append(rep["throughput_hz"])
        ratios.append(streamed[-1] / bare[-1])
        cpu.append(rep["cpu_us_per_frame"])
        bare_cpu.append(b.bare_cpu_us)
        stream_cpu.append(rep["process_cpu_us_per_frame"])
        cpu_ratios.append(bare_cpu[-1] / stream_cpu[-1])
    paced = {f"{int(100 * f)}pct": b.streamed(rate_hz=f * statistics.median(bare)) for f in (0.6, 0.9)}
    stages = {k: statistics.median(c.get(k, 0.0) for c in cpu) for k in cpu[0]}
    return {"bare_hz": bare, "streamed_hz": streamed, "efficiency_median": statistics.median(ratios),
            "efficiency_best": max(streamed) / max(bare), "efficiency_cpu_median": statistics.median(cpu_ratios),
            "process_cpu_us_per_frame": {"bare": statistics.median(bare_cpu), "streamed": statistics.median(stream_cpu)},
            **{f"latency_ms_{k}": _lat(r) for k, r in paced.items()},
            **{f"overhead_p99_ms_{k}": r["latency_ms"]["overhead"]["p99"] for k, r in paced.items()},
            "cpu_us_per_frame": stages, "copies_per_frame": paced["90pct"]["copies_per_frame"]["slot_to_input"]}


def nice(b: Bench, repeats: int, levels: tuple[int, ...] = (0, 5, 10)) -> dict:
    """Helper-thread niceness: efficiency and overhead at 60 % load per level, levels interleaved per round."""
    b.bare(0.5)
    out: dict = {n: {"ratios": [], "overhead_p99_60pct": []} for n in levels}
    for _ in range(repeats):
        for n in levels:
            bare = b.bare()
            out[n]["ratios"].append(b.streamed(nice=n)["throughput_hz"] / bare)
            paced = b.streamed(rate_hz=0.6 * bare, nice=n)
            out[n]["overhead_p99_60pct"].append(paced["latency_ms"]["overhead"]["p99"])
    return {f"nice_{n}": {"efficiency_median": statistics.median(v["ratios"]),
                          "overhead_p99_ms_60pct_median": statistics.median(v["overhead_p99_60pct"]), **v}
            for n, v in out.items()}


def switch(b: Bench, repeats: int, levels: tuple[float | None, ...] = (None, 1.0, 0.5, 0.2)) -> dict:
    """GIL switch interval (ms; None = the interpreter's 5 ms): efficiency, backend idle, overhead p99 at 60 %."""
    b.bare(0.5)
    out: dict = {lv: {"ratios": [], "idle_fraction": [], "overhead_p99_60pct": []} for lv in levels}
    runs: list[tuple[float, float]] = []
    be = b.backend
    submit = be.submit

    def timed_submit(*a, **kw):  # cpu backend: submit() is the inference; the gaps between are idle time
        t0 = time.perf_counter()
        try:
            return submit(*a, **kw)
        finally:
            runs.append((t0, time.perf_counter()))

    be.submit = timed_submit
    try:
        for _ in range(repeats):
            for lv in levels:
                bare = b.bare()
                runs.clear()
                out[lv]["ratios"].append(b.streamed(switch_interval_ms=lv)["throughput_hz"] / bare)
                if len(runs) > 1:
                    r = np.array(runs)
                    out[lv]["idle_fraction"].append(float((r[1:, 0] - r[:-1, 1]).sum() / (r[-1, 1] - r[0, 0])))
                paced = b.streamed(rate_hz=0.6 * bare, switch_interval_ms=lv)
                out[lv]["overhead_p99_60pct"].append(paced["latency_ms"]["overhead"]["p99"])
    finally:
        del be.submit  # back to the class's method
    return {f"switch_{'interpreter' if lv is None else f'{lv}ms'}": {
        "efficiency_median": statistics.median(v["ratios"]),
        "backend_idle_between_batches_median": statistics.median(v["idle_fraction"]) if v["idle_fraction"] else None,
        "overhead_p99_ms_60pct_median": statistics.median(v["overhead_p99_60pct"]), **v} for lv, v in out.items()}


def rates(b: Bench, bare_hz: float) -> dict:
    n = len(b.frames)
    out = {}
    r = b.streamed(rate_hz=0.9 * bare_hz)
    ids = r["subscriber_ids"]
    out["90pct"] = {"rate_hz": 0.9 * bare_hz, "throughput_hz": r["throughput_hz"], "lost": r["dropped"],
                    "published": r["frames_published"], "ids_exactly_once": sorted(ids) == list(range(n)),
                    "in_order": ids == sorted(ids), "latency_ms": _lat(r)}
    slots = 4 * b.batch
    r = b.streamed(rate_hz=1.5 * bare_hz, policy="free-running", slots=slots)
    ids, lost = r["subscriber_ids"], set(r["lost_id_set"])
    pool = 4  # BatcherConfig().pool: batches filling, queued, inferring, posting
    bound_ms = 1e3 * (slots + pool * b.batch) / max(r["throughput_hz"], 1e-9)  # everything that can queue
    out["150pct"] = {
        "rate_hz": 1.5 * bare_hz, "throughput_hz": r["throughput_hz"], "sent": r["source"]["sent"],
        "received": r["frames_received"], "dropped": r["dropped"], "published": r["frames_published"],
        "accounting_exact": (r["source"]["sent"] == n == r["frames_received"] + r["dropped"]
                             and lost.isdisjoint(ids) and lost | set(ids) == set(range(n))
                             and len(ids) == len(set(ids)) == r["frames_published"]),
        "latency_p99_ms": r["latency_ms"]["receive_to_published"]["p99"], "latency_bound_ms": bound_ms,
    }
    normal = b.streamed()
    stalled = b.streamed(stalled_subscriber=True)
    out["stalled_subscriber"] = {
        "throughput_hz": stalled["throughput_hz"], "normal_hz": normal["throughput_hz"],
        "ratio": stalled["throughput_hz"] / normal["throughput_hz"], "published": stalled["frames_published"],
        "publish_dropped": stalled["publisher"]["dropped"]["patch"]}
    return out


def stitch_cases(seed: int = 0) -> dict:
    """Stitcher choices measured on the demo geometry: 64-px patches, 128-px windows, ~57-px probe, spiral."""
    from edgeptycho.physics.forward import extract_patches
    from edgeptycho.physics.metrics import complex_nrmse, phase_nrmse
    from edgeptycho.physics.objects import make_object
    from edgeptycho.physics.probes import gaussian_probe
    from edgeptycho.physics.scans import make_scan, object_shape_for_scan
    from edgeptycho.pipeline.stitcher import LiveStitcher, probe_weight, stitch

    n, m = 128, 64
    rng = np.random.default_rng(seed)
    pos = make_scan("spiral", 1000, 17.0, seed=seed, window=n, margin=2) + rng.uniform(-0.5, 0.5, (1000, 2))
    shape = object_shape_for_scan(pos, n, margin=4)
    obj = make_object("siemens-star", shape, seed=seed)
    w = probe_weight(gaussian_probe(n, 57.0), m)
    true = extract_patches(obj, pos, m)
    offsets = rng.uniform(-np.pi, np.pi, len(pos))

    def score(res):
        mask = res.weight > 0.3 * res.weight.max()
        return {"phase_nrmse": round(phase_nrmse(res.object, obj, mask), 4),
                "complex_nrmse": round(complex_nrmse(res.object, obj, mask), 4)}

    out: dict = {"patches": len(pos), "patch_px": m}
    z = true * np.exp(1j * offsets)[:, None, None]
    for sub in (False, True):
        t0 = time.perf_counter()
        res = stitch(np.abs(z), np.angle(z), pos, w, shape, subpixel=sub)
        out[f"true_patches_subpixel_{'fourier' if sub else 'round'}"] = {**score(res),
                                                                         "seconds": round(time.perf_counter() - t0, 3)}
    yy, xx = np.mgrid[:m, :m] - m // 2
    for noise in (0.1, 0.3):  # CNN-like errors: white phase noise plus a random phase tilt per patch
        tilt = rng.normal(0, 2 * noise / m, (len(pos), 2))
        err = tilt[:, :1, None] * yy + tilt[:, 1:, None] * xx + rng.normal(0, noise, z.shape)
        q = z * np.exp(1j * err)
        for method in ("lsq", "greedy"):
            t0 = time.perf_counter()
            res = stitch(np.abs(q), np.angle(q), pos, w, shape, method=method)
            out[f"noise_{noise}_{method}"] = {**score(res), "seconds": round(time.perf_counter() - t0, 3)}
        live = LiveStitcher(shape, m, w)
        t0 = time.perf_counter()
        for s in range(0, len(pos), 32):
            live.add_batch(np.abs(q[s:s + 32]), np.angle(q[s:s + 32]), pos[s:s + 32])
        dt = time.perf_counter() - t0
        t1 = time.perf_counter()
        live.snapshot()
        out[f"noise_{noise}_live"] = {**score(live.result()), "us_per_patch": round(1e6 * dt / len(pos), 1),
                                      "snapshot_ms": round(1e3 * (time.perf_counter() - t1), 2)}
    return out


def stitch_on_cnn(model: str = "default", presets: tuple[str, ...] = ("siemens-star", "cells")) -> dict:
    """Stitcher choices on real CNN patches: offsets lsq / greedy / none / live, ramp removal on and off."""
    from edgeptycho.hw.registry import open_backend
    from edgeptycho.model.artifact import ModelArtifact
    from edgeptycho.model.preprocess import preprocess
    from edgeptycho.physics.metrics import evaluate
    from edgeptycho.physics.simulate import preset, simulate
    from edgeptycho.physics.types import Reconstruction
    from edgeptycho.pipeline.stitcher import LiveStitcher, canvas_for, probe_weight, stitch

    art = ModelArtifact.load(model)
    out: dict = {"model": art.name}
    with open_backend("cpu", art.path, 32) as be:
        for name in presets:
            scan = simulate(preset(name), seed=0)
            y = be.infer(preprocess(scan.frames, art.preprocess))
            amp, ph, pos, m = y["amplitude"][:, 0], y["phase"][:, 0], scan.positions_px(), art.output_size
            w, dx = probe_weight(scan.probe, m), scan.object_pixel_m

            def score(res, scan=scan, dx=dx):
                e = evaluate(Reconstruction(res.object, dx, scan.positions_m,
                                            origin_m=(res.origin_px[0] * dx, res.origin_px[1] * dx)), scan)
                return {"phase_nrmse": round(e["phase_nrmse"], 4), "complex_nrmse": round(e["complex_nrmse"], 4)}

            row = {f"{meth}_ramp_{'removed' if ramp else 'kept'}": score(stitch(amp, ph, pos, w, method=meth,
                                                                                  remove_ramp=ramp))
                   for meth in ("lsq", "greedy") for ramp in (True, False)}
            row["none"] = score(stitch(amp, ph, pos, w, method="none"))
            shape, origin = canvas_for(pos, m)
            live = LiveStitcher(shape, m, w, origin)
            for k in range(0, len(pos), 32):
                live.add_batch(amp[k:k + 32], ph[k:k + 32], pos[k:k + 32])
            row["live"] = score(live.result())
            row["ramp_rad_per_px"] = stitch(amp, ph, pos, w, remove_ramp=True).ramp  # the fitted slope (0: not significant)
            out[name] = row
    return out


def quality_cost(model: str, batch: int, frames: int, repeats: int,
                 levels: tuple[int | None, ...] = (None, 16, 4, 1)) -> dict:
    """Thread CPU per frame of the quality stage and the service's throughput per `quality.every`."""
    from edgeptycho.hw.registry import open_backend
    from edgeptycho.model.artifact import ModelArtifact
    from edgeptycho.physics.simulate import preset, simulate
    from edgeptycho.pipeline.runner import BatcherConfig, Pipeline, ScanInfo
    from edgeptycho.pipeline.trust import QualityConfig
    from edgeptycho.stream.ring import RingConfig
    from edgeptycho.stream.sources.replay import ArraySource

    art = ModelArtifact.load(model)
    scan = simulate(preset("siemens-star").replace(scan={"n_positions": frames}), seed=7)
    backend = open_backend("cpu", art.path, batch)
    rows: dict[str, list] = {str(lv): [] for lv in levels}
    try:
        for _ in range(repeats):
            for lv in levels:
                q = QualityConfig(enabled=lv is not None, every=lv or 1)
                pipe = Pipeline(ArraySource.from_scan(scan), backend, art.preprocess, art.output_size,
                                RingConfig(slots=4 * batch), scan=ScanInfo.from_scan(scan), publisher=None,
                                batcher=BatcherConfig(), model_info=art.metadata, quality=q)
                rep = pipe.run(timeout=600)
                rows[str(lv)].append((rep["throughput_hz"], rep["cpu_us_per_frame"].get("quality", 0.0)))
    finally:
        backend.close()
    return {k: {"throughput_hz_median": statistics.median(r[0] for r in v),
                "quality_cpu_us_per_frame_median": statistics.median(r[1] for r in v)} for k, v in rows.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--frames", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--only", choices=["efficiency", "rates", "nice", "switch", "stitch", "stitch-cnn", "quality"],
                    action="append")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    only = set(args.only or ["efficiency", "rates", "nice", "switch", "stitch", "stitch-cnn"])
    res: dict = {}
    if only & {"efficiency", "rates", "nice", "switch"}:
        b = Bench(args.model, args.backend, args.batch, args.frames, args.threads)
        res["setup"] = {"model": b.art.name, "backend": b.backend.name, "batch": args.batch, "frames": args.frames}
        try:
            if "efficiency" in only:
                res["efficiency"] = efficiency(b, args.repeats)
            if "nice" in only:
                res["nice"] = nice(b, args.repeats)
            if "switch" in only:
                res["switch"] = switch(b, args.repeats)
            if "rates" in only:
                bare = statistics.median(res["efficiency"]["bare_hz"]) if "efficiency" in res else b.bare()
                res["rates"] = rates(b, bare)
        finally:
            b.close()
    if "stitch" in only:
        res["stitch"] = stitch_cases()
    if "stitch-cnn" in only:
        res["stitch_cnn"] = stitch_on_cnn(args.model)
    if "quality" in only:
        res["quality"] = quality_cost(args.model, args.batch, args.frames, min(args.repeats, 3))
    print(json.dumps(res, indent=None if args.json else 2, default=float))


if __name__ == "__main__":
    main()
