"""ePIE/rPIE/mPIE benchmarks: seconds per iteration, scatter methods, hybrid vs full iterative, quality monitor.

    nice -n 19 python benchmarks/bench_epie.py speed --positions 500 --size 128 --workers 2
    nice -n 19 python benchmarks/bench_epie.py speed --scatter              # loop vs np.add.at in the solver
    nice -n 19 python benchmarks/bench_epie.py headline --scan scan.cxi --init-from cnn_recon.cxi \\
        --hybrid-iters 10 --full-iters 200 [--cnn-seconds 0.8]
    nice -n 10 python benchmarks/bench_epie.py race star.cxi ic.cxi cells.cxi texture.cxi --png race.png
    python benchmarks/bench_epie.py monitor --model default --positions 300 --doses 1e4 1e5 1e6 1e7 --workers 1

`race` runs, per held-out simulated scan and one after the other in one process: the CNN (inference +
stitch, after one untimed warm-up) + N iterations (default mPIE), then M iterations from flat (refine()'s
flat defaults: mPIE with the final quarter annealed); it records the misfit per iteration, the phase
NRMSE per iteration (hybrid) or every k (flat), wall and CPU seconds, the time ratios, and a PNG of quality
against CPU time. With --from-truth it repeats both routes seeded with the true object: what neither route
can beat at that dose.

`speed` simulates a spiral scan (zone-plate probe, 10-nm pixels) unless --scan is given. `headline` runs N
iterations from the seed in --init-from (the stitched CNN reconstruction) and M from a flat object, scores
both against the scan's ground truth, finds the first full-iterative iteration whose phase NRMSE matches the
hybrid's, and reports the wall-time ratio (CNN time from --cnn-seconds or the seed file's metrics). Timings on
a shared machine are noisy: every speed figure is the best of --repeats runs. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from edgeptycho.physics import metrics, simulate
from edgeptycho.physics.epie import EpieOptions, solve
from edgeptycho.physics.types import Reconstruction, ScanData
from edgeptycho.pipeline.trust import QualityConfig


def simulated_scan(n: int, positions: int, modes: int, seed: int = 0, kind: str = "siemens-star",
                   dose: float | None = 1e6) -> ScanData:
    """A spiral scan with the project's zone-plate probe at 10-nm pixels, frames n×n (distance scaled)."""
    spec = simulate.SimulationSpec(
        name="bench-epie",
        geometry=simulate.GeometrySpec(distance_m=1.55 * n / 256, frame_size=n),
        probe=simulate.ProbeSpec(n_modes=modes),
        object=simulate.ObjectSpec(kind=kind),
        scan=simulate.ScanSpec(kind="spiral", n_positions=positions, overlap=0.7),
        noise=simulate.NoiseSpec(dose=dose))
    return simulate.simulate(spec, seed=seed)


def _load_scan(path: str) -> ScanData:
    from edgeptycho.io.cxi import read_scan
    return read_scan(path)


def _grid(scan: ScanData) -> tuple[np.ndarray, np.ndarray]:
    from edgeptycho.pipeline.refine import _prepare
    obj, _origin, pos, _probe, _dx = _prepare(scan, None, None)
    return obj, pos


def time_iterations(scan: ScanData, opts: EpieOptions, iters: int, repeats: int, integer: bool) -> dict:
    """Best-of-`repeats` seconds per iteration (after one warm-up iteration) for one configuration."""
    obj, pos = _grid(scan)
    if integer:
        pos = np.round(pos)
    probe = scan.probe
    best, best_cpu = np.inf, np.inf
    for _ in range(repeats):
        cpu: list[float] = [time.process_time()]
        res = solve(scan.frames, pos, probe, obj, iters + 1, opts, callback=lambda i, e, c=cpu: c.append(time.process_time()))
        best = min(best, float(np.median(res.seconds[1:])))
        best_cpu = min(best_cpu, float(np.median(np.diff(cpu)[1:])))
    # on a shared machine wall time includes waiting for a core; process CPU time (all threads) does not
    return {"method": opts.method, "batch_size": opts.batch_size, "scatter": opts.scatter, "integer_positions": integer,
            "probe_update": opts.probe_update_start is not None, "modes": int(probe.shape[0]),
            "s_per_iter": best, "cpu_s_per_iter": best_cpu, "ms_per_position": 1e3 * best / scan.n_frames}


def cmd_speed(a: argparse.Namespace) -> dict:
    scan = _load_scan(a.scan) if a.scan else simulated_scan(a.size, a.positions, a.modes)
    out = {"frames": list(scan.frames.shape), "workers": a.workers, "backend": a.backend, "runs": []}
    scatters = ("loop", "add_at") if a.scatter else ("auto",)
    for integer in (True, False):
        for probe_start in (None, 0):
            for bs in a.batch_sizes:
                for sc in scatters:
                    if bs == 1 and sc != scatters[0]:
                        continue
                    opts = EpieOptions(method=a.method, batch_size=bs, probe_update_start=probe_start, scatter=sc,
                                       workers=a.workers, backend=a.backend)
                    iters = max(1, a.iters // 3) if bs == 1 else a.iters
                    r = time_iterations(scan, opts, iters, a.repeats, integer)
                    out["runs"].append(r)
                    print(json.dumps(r), file=sys.stderr, flush=True)
    return out


def _first_match(curve: list[float], target: float) -> int | None:
    for i, v in enumerate(curve):
        if v <= target:
            return i + 1
    return None


def cmd_headline(a: argparse.Namespace) -> dict:
    from edgeptycho.io.cxi import read_reconstruction
    from edgeptycho.pipeline.refine import _prepare, refine

    scan = _load_scan(a.scan) if a.scan else simulated_scan(a.size, a.positions, a.modes)
    if scan.object_truth is None:
        raise SystemExit("headline needs a scan with ground truth (a simulated CXI scan)")
    seed = read_reconstruction(a.init_from)
    cnn_s = a.cnn_seconds if a.cnn_seconds is not None else float(seed.metrics.get("inference_seconds", 0.0))
    opts = EpieOptions(method=a.method, batch_size=a.batch_size, probe_update_start=None, workers=a.workers, backend=a.backend)
    seed_q = metrics.evaluate(seed, scan)
    t0 = time.perf_counter()
    hybrid = refine(scan, seed, n_iters=a.hybrid_iters, options=opts)
    t_hybrid = time.perf_counter() - t0
    hq = metrics.evaluate(hybrid, scan)

    obj, origin, pos, probe, dx = _prepare(scan, None, None)
    full_res = solve(scan.frames, pos, probe, obj, a.full_iters, opts, scan.mask, snapshot_every=a.every)
    curve = [metrics.evaluate(Reconstruction(o, dx, scan.positions_m, origin_m=tuple(origin)), scan)["phase_nrmse"]
             for _, o in full_res.snapshots]
    full = Reconstruction(full_res.object, dx, scan.positions_m, probe=full_res.probe, origin_m=tuple(origin))
    full.metrics["refine_seconds"] = float(full_res.seconds.sum())
    fq = metrics.evaluate(full, scan)
    t_full_per_iter = float(full.metrics["refine_seconds"]) / max(a.full_iters, 1)
    match = _first_match(curve, hq["phase_nrmse"])
    match_iters = None if match is None else match * a.every
    t_match = None if match_iters is None else match_iters * t_full_per_iter
    return {
        "seed": seed_q, "hybrid": hq, "full": fq,
        "hybrid_iters": a.hybrid_iters, "full_iters": a.full_iters,
        "hybrid_seconds": t_hybrid + cnn_s, "cnn_seconds": cnn_s,
        "full_seconds": float(full.metrics["refine_seconds"]),
        "full_phase_nrmse_every": curve, "every": a.every,
        "full_iters_to_match_hybrid": match_iters,
        "speedup_at_matching_quality": None if t_match is None else t_match / (t_hybrid + cnn_s),
        "speedup_vs_full_run": float(full.metrics["refine_seconds"]) / (t_hybrid + cnn_s),
    }


def _run_curve(scan: ScanData, seed, n_iters: int, every: int, opts: EpieOptions) -> dict:
    """One solver run from a seed (None = flat): wall and CPU seconds, misfit per iteration, phase NRMSE every k."""
    from edgeptycho.pipeline.refine import _prepare

    obj, origin, pos, probe, dx = _prepare(scan, seed, None)
    c0, t0 = time.process_time(), time.perf_counter()
    res = solve(scan.frames, pos, probe, obj, n_iters, opts, scan.mask, snapshot_every=every)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    score = [metrics.evaluate(Reconstruction(o, dx, scan.positions_m, origin_m=tuple(origin)), scan)
             for _, o in res.snapshots]
    return {"iters": [i for i, _ in res.snapshots], "phase_nrmse": [q["phase_nrmse"] for q in score],
            "complex_nrmse_final": score[-1]["complex_nrmse"] if score else None,
            "phase_nrmse_interior_final": score[-1]["phase_nrmse_interior"] if score else None,
            "edge_error_share_final": score[-1]["edge_error_share"] if score else None,
            "misfit": res.convergence.tolist(), "seconds": res.seconds.tolist(), "wall_s": wall, "cpu_s": cpu}


def cmd_race(a: argparse.Namespace) -> dict:
    """CNN (+ stitch) + N iterations against M iterations from flat, one after the other, per held-out scan."""
    from edgeptycho.commands.reconstruct import reconstruct_scan
    from edgeptycho.pipeline.refine import flat_options

    hybrid_opts = EpieOptions(method=a.method, batch_size=a.batch_size, workers=a.workers, backend=a.backend)
    full_opts = flat_options(a.full_iters, hybrid_opts) if a.anneal else hybrid_opts
    out: dict = {"model": a.model, "hybrid": hybrid_opts.__dict__, "full": full_opts.__dict__, "scans": {}}
    # untimed warm-up: the first scan should not carry the process's one-off costs (imports, ONNX Runtime's
    # first session), which a running service has paid before its first scan
    reconstruct_scan(_load_scan(a.scans[0]), a.model)
    for path in a.scans:
        scan = _load_scan(path)
        c0, t0 = time.process_time(), time.perf_counter()
        seed, _times = reconstruct_scan(scan, a.model)
        cnn_wall, cnn_cpu = time.perf_counter() - t0, time.process_time() - c0
        cnn_q = metrics.evaluate(seed, scan)["phase_nrmse"]
        hyb = _run_curve(scan, seed, a.hybrid_iters, 1, hybrid_opts)
        full = _run_curve(scan, None, a.full_iters, a.every, full_opts)
        h_wall, h_cpu = cnn_wall + hyb["wall_s"], cnn_cpu + hyb["cpu_s"]
        match = _first_match(full["phase_nrmse"], hyb["phase_nrmse"][-1])
        row = {"cnn_phase_nrmse": cnn_q, "cnn_wall_s": cnn_wall, "cnn_cpu_s": cnn_cpu, "hybrid": hyb, "full": full,
               "hybrid_total_wall_s": h_wall, "hybrid_total_cpu_s": h_cpu,
               "wall_ratio": full["wall_s"] / h_wall, "cpu_ratio": full["cpu_s"] / h_cpu,
               "hybrid_beats_full": hyb["phase_nrmse"][-1] <= full["phase_nrmse"][-1],
               "full_iters_to_match_hybrid": None if match is None else match * a.every}
        if a.from_truth:  # the same two runs from a perfect seed: the floor the data leave each route
            truth = Reconstruction(np.asarray(scan.object_truth), scan.object_pixel_m, scan.positions_m)
            row["truth_hybrid"] = _run_curve(scan, truth, a.hybrid_iters, 1, hybrid_opts)
            row["truth_full"] = _run_curve(scan, truth, a.full_iters, a.every, full_opts)
            row["truth_phase_nrmse"] = {"hybrid": row["truth_hybrid"]["phase_nrmse"][-1],
                                        "full": row["truth_full"]["phase_nrmse"][-1]}
        out["scans"][path] = row
        print(path, json.dumps({"cnn": cnn_q, "hybrid": hyb["phase_nrmse"][-1], "full": full["phase_nrmse"][-1],
                                "wall_ratio": row["wall_ratio"], "cpu_ratio": row["cpu_ratio"],
                                **({"from_truth": row["truth_phase_nrmse"]} if a.from_truth else {})}),
              file=sys.stderr, flush=True)
    if a.png:
        _plot_race(out, a.png)
    return out


def _plot_race(out: dict, png: str) -> None:
    """Phase NRMSE against CPU seconds (both routes) and Fourier misfit per iteration, one colour per scan."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (path, r) in enumerate(out["scans"].items()):
        col = f"C{i}"
        name = path.rsplit("/", 1)[-1].removesuffix(".cxi")
        hs, fs = r["hybrid"], r["full"]
        h_t = r["cnn_cpu_s"] + np.cumsum(hs["seconds"]) * hs["cpu_s"] / max(hs["wall_s"], 1e-9)
        f_t = np.cumsum(fs["seconds"]) * fs["cpu_s"] / max(fs["wall_s"], 1e-9)
        ax1.plot([r["cnn_cpu_s"], *h_t[np.array(hs["iters"]) - 1]], [r["cnn_phase_nrmse"], *hs["phase_nrmse"]],
                 "-o", ms=3, color=col, label=f"{name}: CNN + {len(hs['misfit'])}")
        ax1.plot(f_t[np.array(fs["iters"]) - 1], fs["phase_nrmse"], "--", color=col,
                 label=f"{name}: {len(fs['misfit'])} from flat")
        ax2.semilogy(np.arange(1, len(hs["misfit"]) + 1), hs["misfit"], "-", color=col)
        ax2.semilogy(np.arange(1, len(fs["misfit"]) + 1), fs["misfit"], "--", color=col)
    ax1.set(xscale="log", yscale="log", xlabel="CPU seconds (CNN + stitch included)", ylabel="phase NRMSE",
            title="quality against time")
    ax1.axhline(0.02, color="k", lw=0.5)
    ax1.legend(fontsize=7)
    ax2.set(xlabel="iteration", ylabel="Fourier misfit E", title="convergence (solid: CNN seed, dashed: flat)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def cmd_quality(a: argparse.Namespace) -> dict:
    """Full rPIE from a flat object on held-out simulated scans, per object kind: phase NRMSE vs iterations."""
    from edgeptycho.physics.objects import OBJECT_KINDS
    from edgeptycho.pipeline.refine import _prepare

    out: dict = {"size": a.size, "positions": a.positions, "iters": a.iters, "seed": a.seed, "kinds": {}}
    for kind in (OBJECT_KINDS if a.kinds == ["all"] else a.kinds):
        scan = simulated_scan(a.size, a.positions, a.modes, seed=a.seed, kind=kind, dose=a.dose)
        obj, origin, pos, probe, dx = _prepare(scan, None, None)
        row = {}
        runs = [("known_probe", None)] + ([("probe_refined", a.probe_start)] if a.probe_refined else [])
        for label, start in runs:
            opts = EpieOptions(method=a.method, batch_size=a.batch_size, probe_update_start=start, workers=a.workers)
            res = solve(scan.frames, pos, probe, obj, a.iters, opts, scan.mask, snapshot_every=a.every)
            rec = [Reconstruction(o, dx, scan.positions_m, origin_m=tuple(origin)) for _, o in res.snapshots]
            curve = [metrics.evaluate(r, scan) for r in rec]
            # the default mask (10 % of the probe peak) includes the scan's weakly lit rim; the interior
            # figure (50 %) is the one comparable with codes that crop their reconstructions
            interior = metrics.evaluate(rec[-1], scan, threshold=0.5)
            row[label] = {"phase_nrmse": [c["phase_nrmse"] for c in curve],
                          "phase_nrmse_interior_final": interior["phase_nrmse"],
                          "complex_nrmse_final": curve[-1]["complex_nrmse"],
                          "frc_half_pitch_m_final": curve[-1]["frc_half_pitch_m"],
                          "misfit_final": float(res.convergence[-1]), "seconds": float(res.seconds.sum())}
            print(kind, label, json.dumps({k: v for k, v in row[label].items() if k != "phase_nrmse"}),
                  "phase_nrmse final", row[label]["phase_nrmse"][-1], file=sys.stderr, flush=True)
        out["kinds"][kind] = row
    return out


def _degrade(patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One imperfect 'prediction': smoothed phase/amplitude noise, blur, phase-contrast loss, or a mix."""
    from scipy.ndimage import gaussian_filter
    x = patch.astype(np.complex64)
    kind = rng.integers(4)
    s = rng.uniform(0.0, 1.0)
    if kind in (0, 3):  # correlated noise, as CNN errors are
        noise = gaussian_filter(rng.standard_normal((2, *x.shape)), (0, 1.5, 1.5)) * 3.0
        x = x * (1 + 0.3 * s * noise[0]) * np.exp(1j * 0.6 * s * noise[1])
    if kind in (1, 3):
        x = gaussian_filter(x.real, 3 * s) + 1j * gaussian_filter(x.imag, 3 * s)
    if kind == 2:  # phase contrast loss around the mean: a typical regression-to-the-mean error
        mean = np.angle(np.mean(x))
        x = np.abs(x) * np.exp(1j * (mean + (1 - 0.6 * s) * np.angle(x * np.exp(-1j * mean))))
    return x.astype(np.complex64)


def _live_scores(pred: np.ndarray, res: np.ndarray, scan, m: int, delay: int, batch: int = 32):
    """The service's score, as its quality stage computes it: patches blended into a LiveStitcher in scan
    order, batch by batch, each frame scored once `delay` more frames are in (pipeline.score.DelayedScores).
    """
    from edgeptycho.pipeline.live_stitch import LiveStitcher
    from edgeptycho.pipeline.score import DelayedScores
    from edgeptycho.pipeline.stitcher import canvas_for, probe_weight

    pos = scan.positions_px()
    shape, origin = canvas_for(pos, m)
    st = LiveStitcher(shape, m, probe_weight(scan.probe, m), origin_px=origin)
    amp, ph = np.abs(pred).astype(np.float32), np.angle(pred).astype(np.float32)
    scorer = DelayedScores(delay)
    dis = np.full(len(pred), np.nan, np.float32)
    score = np.full(len(pred), np.nan, np.float32)
    for s in range(0, len(pred), batch):
        e = min(s + batch, len(pred))
        idx = np.arange(s, e)
        # as in serve: the quality stage checks a batch before the post stage places it, and scores the
        # rest at the end of the series, once the last batch is placed
        scorer.add(idx, amp[s:e], ph[s:e], pos[s:e], res[s:e], idx.tolist())
        keys, _, d, sc = scorer.collect(st)
        dis[keys], score[keys] = d, sc
        st.add_batch(amp[s:e], ph[s:e], pos[s:e])
    keys, _, d, sc = scorer.collect(st, final=True)
    dis[keys], score[keys] = d, sc
    return dis, score


def cmd_monitor(a: argparse.Namespace) -> dict:
    """Does the label-free residual rank frames by their true patch error? Spearman per kind and dose; cost."""
    from scipy.stats import spearmanr

    from edgeptycho.physics.forward import extract_patches
    from edgeptycho.physics.objects import OBJECT_KINDS
    from edgeptycho.pipeline.quality import ForwardResidual

    art = None
    if a.model:  # the CNN's own patches of the simulation presets' scans (its geometry), not degraded truths
        from edgeptycho.commands.reconstruct import infer_scan
        from edgeptycho.model.artifact import ModelArtifact
        from edgeptycho.physics.simulate import preset, simulate

        art = ModelArtifact.load(a.model)
        a.patch = art.output_size
    m = a.patch
    grid = a.grid if a.grid == "auto" else int(a.grid)
    out: dict = {"size": a.size, "patch": m, "grid": a.grid, "extend": a.extend, "pad_mode": a.pad_mode,
                 "model": a.model, "cases": []}
    rng = np.random.default_rng(a.seed)
    pooled: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for kind in (OBJECT_KINDS if a.kinds == ["all"] else a.kinds):
        for dose in a.doses:
            if art is None:
                scan = simulated_scan(a.size, a.positions, a.modes, seed=a.seed, kind=kind,
                                      dose=None if dose <= 0 else dose)
            else:
                spec = preset(kind).replace(scan={"n_positions": a.positions}, noise={"dose": dose})
                scan = simulate(spec, seed=a.seed)
            dx = scan.metadata["object_pixel_m"]
            n = scan.frame_size
            truth = extract_patches(scan.object_truth, scan.positions_m / dx, n)
            o = n // 2 - m // 2
            truth = truth[:, o:o + m, o:o + m]
            if art is None:
                pred = np.stack([_degrade(t, rng) for t in truth])
            else:
                amp, ph, _ = infer_scan(scan, art)
                pred = amp * np.exp(1j * ph)
            w = (np.abs(scan.probe[:, o:o + m, o:o + m]) ** 2).sum(0)
            foot = w > 0.1 * w.max()
            # true error: probe-weighted complex error after the best global phase (the residual ignores it)
            dots = np.einsum("bij,bij->b", np.conj(pred) * w, truth)
            best = pred * (dots / np.maximum(np.abs(dots), 1e-30))[:, None, None]
            err = np.sqrt((w * np.abs(best - truth) ** 2).sum((1, 2)) / (w * np.abs(truth) ** 2).sum((1, 2)))
            ph_err = np.array([metrics.phase_nrmse(p, t, foot) for p, t in zip(pred, truth, strict=True)])
            fr = ForwardResidual(scan.probe, m, grid, extend=a.extend, pad_mode=a.pad_mode)
            res = fr(scan.frames, np.abs(pred), np.angle(pred))
            dis, score = _live_scores(pred, res, scan, m, a.score_delay)
            # residual floor: the true patches themselves (noise + probe truncation)
            floor = fr(scan.frames, np.abs(truth), np.angle(truth))
            pooled.append((score, err, ph_err))
            case = {"kind": kind, "dose": dose, "frames": int(len(res)), "grid": fr.g,
                    # the figure the service ranks and thresholds: residual × disagreement^alpha
                    "spearman_weighted_complex": float(spearmanr(score, err)[0]),
                    "spearman_residual_only": float(spearmanr(res, err)[0]),
                    "spearman_disagreement_only": float(spearmanr(np.nan_to_num(dis, nan=np.nanmedian(dis)),
                                                                 err)[0]),
                    "spearman_phase_nrmse": float(spearmanr(score, ph_err)[0]),
                    "residual_floor_median": float(np.median(floor)),
                    "residual_median": float(np.median(res)),
                    "true_error_median": float(np.median(err)), "true_error_iqr": float(np.subtract(
                        *np.percentile(err, [75, 25])))}
            out["cases"].append(case)
            print(json.dumps(case), file=sys.stderr, flush=True)
    # cost per frame in the paper geometry: 256-px frames, 3 modes, batch 256
    # the finest (dearest) grid, the window: what the monitor costs at high dose
    fr = ForwardResidual(np.ones((3, a.cost_frame, a.cost_frame), np.complex64), m, None, extend=a.extend,
                         pad_mode=a.pad_mode)
    frames = np.ones((256, a.cost_frame, a.cost_frame), np.uint32)
    amp = np.ones((256, m, m), np.float32)
    best = np.inf
    for _ in range(5):
        t0 = time.perf_counter()
        fr(frames, amp, amp)
        best = min(best, time.perf_counter() - t0)
    out["cost_us_per_frame"] = 1e6 * best / 256
    out["cost_geometry"] = {"frame": a.cost_frame, "patch": m, "grid": fr.g, "extend": fr.e, "modes": 3,
                            "batch": 256}
    cases = out["cases"]
    res, err, ph_err = (np.concatenate(v) for v in zip(*pooled, strict=True))
    out["pooled"] = {"frames": int(len(res)), "spearman_weighted_complex": float(spearmanr(res, err)[0]),
                     "spearman_phase_nrmse": float(spearmanr(res, ph_err)[0])}
    out["spearman_weighted_complex_min"] = min(c["spearman_weighted_complex"] for c in cases)
    out["spearman_weighted_complex_median"] = float(np.median([c["spearman_weighted_complex"] for c in cases]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("speed", "headline", "quality", "monitor", "race"):
        s = sub.add_parser(name)
        s.add_argument("--scan", help="CXI scan (default: simulate one)")
        s.add_argument("--positions", type=int, default=500)
        s.add_argument("--size", type=int, default=128, help="frame size of the simulated scan")
        s.add_argument("--modes", type=int, default=1)
        s.add_argument("--workers", type=int, default=2, help="scipy.fft threads")
        s.add_argument("--backend", default="numpy", choices=("numpy", "torch", "cupy", "auto"))
        s.add_argument("--method", default="mpie", choices=("epie", "rpie", "mpie"))
    sp = sub.choices["speed"]
    sp.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 64])
    sp.add_argument("--iters", type=int, default=6)
    sp.add_argument("--repeats", type=int, default=2)
    sp.add_argument("--scatter", action="store_true", help="compare loop and add_at scatter")
    hp = sub.choices["headline"]
    hp.add_argument("--init-from", required=True, help="seed reconstruction CXI (the stitched CNN output)")
    hp.add_argument("--hybrid-iters", type=int, default=10)
    hp.add_argument("--full-iters", type=int, default=200)
    hp.add_argument("--every", type=int, default=10, help="score the full run every this many iterations")
    hp.add_argument("--batch-size", type=int, default=32)
    hp.add_argument("--cnn-seconds", type=float, default=None, help="CNN inference + stitching wall time")
    qp = sub.choices["quality"]
    qp.add_argument("--kinds", nargs="+", default=["all"])
    qp.add_argument("--iters", type=int, default=200)
    qp.add_argument("--every", type=int, default=10)
    qp.add_argument("--batch-size", type=int, default=32)
    qp.add_argument("--probe-refined", action="store_true", help="also run with the probe updated")
    qp.add_argument("--probe-start", type=int, default=10, help="probe update start for the probe-refined run")
    qp.add_argument("--dose", type=float, default=1e6)
    qp.add_argument("--seed", type=int, default=12345, help="held-out seed (training sets use low seeds)")
    mp = sub.choices["monitor"]
    mp.add_argument("--kinds", nargs="+", default=["all"])
    mp.add_argument("--doses", type=float, nargs="+", default=[1e4, 1e5, 1e6], help="<= 0: noise-free")
    mp.add_argument("--patch", type=int, default=64, help="CNN output patch size M")
    mp.add_argument("--grid", default="auto", help="comparison grid G: auto (from the counts) or an int")
    mp.add_argument("--seed", type=int, default=777)
    mp.add_argument("--extend", type=int, default=None, help="pad the patch to this window (default: 2M)")
    mp.add_argument("--pad-mode", default="edge", help="numpy pad mode for --extend")
    mp.add_argument("--cost-frame", type=int, default=256, help="frame size for the cost measurement")
    mp.add_argument("--score-delay", type=int, default=QualityConfig.score_delay,
                    help="frames placed after a checked frame before it is scored (serve's quality.score_delay)")
    mp.add_argument("--model", help="score this CNN's own patches (zoo name or .onnx) on the simulation "
                                    "presets' scans (--positions of each kind, --seed, each dose) instead of "
                                    "degraded true patches; --size/--modes/--patch then come from the presets")
    rp = sub.choices["race"]
    rp.add_argument("scans", nargs="+", help="simulated CXI scans (edgeptycho simulate --preset K --seed S)")
    rp.add_argument("--model", default="default", help="CNN for the seed")
    rp.add_argument("--batch-size", type=int, default=32)
    rp.add_argument("--hybrid-iters", type=int, default=10)
    rp.add_argument("--full-iters", type=int, default=200)
    rp.add_argument("--every", type=int, default=10, help="score the run from flat every this many iterations")
    rp.add_argument("--no-anneal", dest="anneal", action="store_false",
                    help="run from flat without refine()'s final step annealing")
    rp.add_argument("--png", help="write the quality-vs-time and convergence figure here")
    rp.add_argument("--from-truth", action="store_true",
                    help="also run both routes from the true object: the error the noise alone leaves")
    a = p.parse_args(argv)
    out = {"speed": cmd_speed, "headline": cmd_headline, "quality": cmd_quality, "monitor": cmd_monitor,
           "race": cmd_race}[a.cmd](a)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
