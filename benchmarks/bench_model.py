"""Model benchmarks: ONNX Runtime CPU throughput of a model (or a width sweep of candidate presets) per batch size.

    python benchmarks/bench_model.py --model default --batches 1 8 32 --threads 2
    python benchmarks/bench_model.py --sweep --threads 2          # choose the CPU default by measurement
    python benchmarks/bench_model.py --quality --model default    # stitched phase NRMSE per kind and dose
    python benchmarks/bench_model.py --sessions 1 2 --threads 2   # through the cpu backend, 1 vs 2 sessions

Timings on a shared machine are noisy: every figure is the best of `--repeats` timed runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def ort_session(onnx_path: str | Path, threads: int = 2) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])


def _rate(sess: ort.InferenceSession, x: np.ndarray, seconds: float) -> float:
    name = sess.get_inputs()[0].name
    t0 = time.perf_counter()
    count = 0
    while True:
        sess.run(None, {name: x})
        count += x.shape[0]
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return count / dt


def ort_throughput_many(paths: list[str | Path], batch: int, threads: int = 2, repeats: int = 5,
                        seconds: float = 1.0) -> list[float]:
    """Best-of-`repeats` patterns/s of each model at `batch` on ONNX Runtime CPU (`threads` intra-op threads).

    The models are measured in interleaved rounds so that load from other processes hits all of them alike.
    """
    sessions = [ort_session(p, threads) for p in paths]
    inputs = []
    for s in sessions:
        n = int(s.get_inputs()[0].shape[-1])
        x = np.random.default_rng(0).random((batch, 1, n, n), dtype=np.float32)
        s.run(None, {s.get_inputs()[0].name: x})  # warm-up: first run allocates and picks kernels
        inputs.append(x)
    best = [0.0] * len(paths)
    for _ in range(repeats):
        for i, (s, x) in enumerate(zip(sessions, inputs, strict=True)):
            best[i] = max(best[i], _rate(s, x, seconds))
    return best


def ort_throughput(onnx_path: str | Path, batch: int, threads: int = 2, repeats: int = 5,
                   seconds: float = 1.0) -> float:
    """Best-of-`repeats` patterns/s of one model at `batch` on ONNX Runtime CPU."""
    return ort_throughput_many([onnx_path], batch, threads, repeats, seconds)[0]


def backend_sessions(model: str, batches: list[int], sessions: list[int], threads: int, repeats: int,
                     seconds: float = 2.0) -> dict:
    """Patterns/s through edgeptycho's cpu backend (double-buffered submit/wait, tools.hil.throughput) with
    each number of parallel sessions, in interleaved rounds; median and all rounds per (batch, sessions)."""
    import statistics

    from edgeptycho.hw.registry import open_backend
    from edgeptycho.model.artifact import ModelArtifact
    from edgeptycho.tools.hil import throughput

    art = ModelArtifact.load(model)
    rounds: dict[tuple[int, int], list[float]] = {}
    backends = {(b, w): open_backend("cpu", art.path, b, threads=threads, workers=w)
                for b in batches for w in sessions}
    try:
        for _ in range(repeats):
            for (b, w), be in backends.items():
                x = np.random.default_rng(0).random(be.input_spec.shape, dtype=np.float32)
                rate = throughput(be, x, 8)["frames_per_s"]  # a short run sizes the timed one to `seconds`
                n = max(8, int(seconds * rate / b))
                rounds.setdefault((b, w), []).append(throughput(be, x, n)["frames_per_s"])
    finally:
        for be in backends.values():
            be.close()
    out = {"model": art.name, "threads": threads, "rounds": repeats, "patterns_per_s": {}}
    for (b, w), r in rounds.items():
        out["patterns_per_s"][f"batch{b}_sessions{w}"] = {"median": statistics.median(r), "all": r}
        print(f"{art.name}: batch {b:3d}, {w} session(s): median {statistics.median(r):8.1f} patterns/s "
              f"(rounds {', '.join(f'{v:.0f}' for v in r)})", flush=True)
    return out


# Candidate CPU-default architectures (128 in → 64 out); the chosen one is in presets/cpu-default.yaml.
SWEEP = {
    # purely convolutional bottleneck (4×4 map): measured, but did not learn within the CPU training budget
    "w16": {"widths": [16, 32, 64, 128, 128]},
    "w16-256": {"widths": [16, 32, 64, 128, 256]},
    "w16-nn": {"widths": [16, 32, 64, 128, 128], "upsample": "nearest-conv"},
    "w24": {"widths": [24, 48, 96, 192, 192]},
    "w32": {"widths": [32, 64, 128, 256, 256]},
    # dense bottleneck on the 16×16 map (stage 3): the chosen cpu-default is "dense3-512"
    "dense3-256": {"widths": [16, 32, 8, 256, 256], "bottleneck": "dense", "dense_stage": 3},
    "dense3-512": {"widths": [16, 32, 8, 512, 512], "bottleneck": "dense", "dense_stage": 3},
    "dense3-512-nn": {"widths": [16, 32, 8, 512, 512], "bottleneck": "dense", "dense_stage": 3,
                      "upsample": "nearest-conv"},
    "dense3-w32": {"widths": [32, 64, 8, 512, 512], "bottleneck": "dense", "dense_stage": 3},
    "dense4-448": {"widths": [16, 32, 64, 32, 448], "bottleneck": "dense", "dense_stage": 4},
}


def sweep(threads: int, batch: int, repeats: int) -> list[dict]:
    from edgeptycho.model.export import export_onnx
    from edgeptycho.model.network import NetworkConfig, build_network, count_parameters, flops

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name, over in SWEEP.items():
            cfg = NetworkConfig(input_size=128, output_size=64, **over)
            paths.append(export_onnx(build_network(cfg), Path(tmp) / f"{name}.onnx"))
            rows.append({"name": name, "config": over, "params": count_parameters(cfg),
                         "gflop": flops(cfg) / 1e9})
        rates = ort_throughput_many(paths, batch, threads, repeats)
    for row, rate in zip(rows, rates, strict=True):
        row["patterns_per_s"] = rate
        print(f"{row['name']:13s} params {row['params']:>9,d}  {row['gflop']:.3f} GFLOP  "
              f"{rate:8.1f} patterns/s (batch {batch}, {threads} threads, best of {repeats})", flush=True)
    return rows


def quality(model: str, kinds: list[str], doses: list[float], seed0: int = 1000, positions: int | None = None,
            workdir: str | None = None) -> list[dict]:
    """Stitched-image quality on held-out simulated scans: for kind k (index i) and each dose, the scan of
    `edgeptycho simulate --preset KIND --seed SEED0+i --dose D` is reconstructed with `model` on the cpu
    backend (`edgeptycho reconstruct`) and scored (`edgeptycho evaluate`)."""
    from edgeptycho.commands.reconstruct import reconstruct_scan
    from edgeptycho.io.cxi import open_scan, write_scan
    from edgeptycho.physics.metrics import evaluate
    from edgeptycho.physics.simulate import preset, simulate

    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for i, kind in enumerate(kinds):
            for dose in doses:
                spec = preset(kind).replace(noise={"dose": dose})
                if positions:
                    spec = spec.replace(scan={"n_positions": positions})
                path = Path(tmp) / f"{kind}-{dose:.0e}.cxi"
                write_scan(path, simulate(spec, seed=seed0 + i), compression="none")
                with open_scan(path) as scan:
                    recon, times = reconstruct_scan(scan, model)
                    m = evaluate(recon, scan)
                rows.append({"kind": kind, "seed": seed0 + i, "dose": dose, "phase_nrmse": m["phase_nrmse"],
                             "complex_nrmse": m["complex_nrmse"], "phase_ssim": m["phase_ssim"],
                             "frc_half_pitch_nm": m["frc_half_pitch_m"] * 1e9, "n_frames": scan.n_frames,
                             "infer_s": times["infer"], "stitch_s": times["stitch"]})
                r = rows[-1]
                print(f"{kind:13s} seed {r['seed']} dose {dose:8.0e}: phase NRMSE {r['phase_nrmse']:.4f}  complex "
                      f"NRMSE {r['complex_nrmse']:.4f}  phase SSIM {r['phase_ssim']:.3f}  FRC half-pitch "
                      f"{r['frc_half_pitch_nm']:.1f} nm", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="zoo name or .onnx path")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sweep", action="store_true", help="measure the candidate CPU-default widths instead")
    ap.add_argument("--quality", action="store_true",
                    help="stitched phase NRMSE on held-out simulated scans of each object kind and dose")
    ap.add_argument("--kinds", nargs="+", default=["siemens-star", "ic", "cells", "texture"])
    ap.add_argument("--doses", type=float, nargs="+", default=[1e5, 1e6, 1e7])
    ap.add_argument("--positions", type=int, help="scan positions (default: the preset's)")
    ap.add_argument("--sessions", type=int, nargs="+",
                    help="measure through the cpu backend with these numbers of parallel sessions instead")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.sessions:
        result: object = backend_sessions(args.model, args.batches, args.sessions, args.threads, args.repeats)
    elif args.sweep:
        result = sweep(args.threads, max(args.batches), args.repeats)
    elif args.quality:
        result = quality(args.model, args.kinds, args.doses, positions=args.positions)
    else:
        from edgeptycho.model.artifact import ModelArtifact

        art = ModelArtifact.load(args.model)
        result = {"model": art.name, "sha256": art.sha256, "threads": args.threads, "patterns_per_s": {}}
        for b in args.batches:
            rate = ort_throughput(art.path, b, args.threads, args.repeats)
            result["patterns_per_s"][b] = rate  # type: ignore[index]
            print(f"{art.name}: batch {b:3d}: {rate:8.1f} patterns/s ({args.threads} threads)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
