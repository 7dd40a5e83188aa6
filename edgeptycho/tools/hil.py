"""Hardware-in-loop check: run a backend on a reference batch, compare with CPU FP32, report speed and telemetry.

    python -m edgeptycho.tools.hil --backend jetson --model default --precision fp16

Exit status 0 when every output agrees with the CPU FP32 reference within the precision's tolerance, 1 when
not, 2 when the backend cannot be opened (the error names what is missing and how to get it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

# Agreement with CPU FP32, as fractions of the reference output's range (max − min) over the batch.
# fp32: different kernels and summation order only. fp16: unit roundoff 2**-11 ≈ 4.9e-4 per rounding, ~10
# roundings in series → ~1e-3 worst case; 1e-2 leaves 10× margin. int8: each quantised tensor adds rounding
# noise of rms LSB/√12 with LSB ≤ 2·amax/128 (pow2 scales waste up to a bit), ≈0.45 % of its range; ~8 such
# tensors in series add in quadrature to ≈1.3 % rms, so rms ≤ 3 %; the max over thousands of pixels sits near
# 4–5 σ, so max ≤ 15 %. Measured on the 32-px test model, synthetic calibration, 64 frames: fp16 3e-4 max;
# trt-int8 0.4 % rms / 11 % max (a clipping calibrator saturates a few outliers); dpu-pow2 0.5 % / 6 %.
TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"max": 1e-4, "rms": 1e-5},
    "fp16": {"max": 1e-2, "rms": 2e-3},
    "int8": {"max": 0.15, "rms": 0.03},
}


def agreement(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], precision: str) -> dict[str, Any]:
    """Per output: max and rms |got − ref| / range(ref) (phase differences wrapped), and whether within tolerance."""
    tol = TOLERANCES[precision]
    report: dict[str, Any] = {}
    for name, r in ref.items():
        g = got[name]
        if g.shape != r.shape:
            raise ValueError(f"output '{name}': shape {g.shape} differs from reference {r.shape}")
        d = g.astype(np.float64) - r
        if "phase" in name:
            d = np.angle(np.exp(1j * d))
        span = float(r.max() - r.min()) or 1.0
        mx, rms = float(np.abs(d).max()) / span, float(np.sqrt(np.mean(d**2))) / span
        report[name] = {"max": mx, "rms": rms, "range": span, "ok": mx <= tol["max"] and rms <= tol["rms"]}
    return report


def _options(pairs: list[str]) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--option expects key=value, got '{pair}'")
        try:
            opts[key] = json.loads(value)
        except json.JSONDecodeError:
            opts[key] = value
    return opts


def throughput(backend: Any, x: np.ndarray, batches: int) -> dict[str, float]:
    """Double-buffered submit/wait over `batches` full batches in device-visible memory; per-batch latency."""
    alloc = backend.allocator()
    spec = backend.input_spec
    slots = [alloc.empty(spec.shape, spec.dtype) for _ in range(2)]
    outs = [backend.new_outputs(alloc) for _ in range(2)]
    for slot in slots:
        src = np.resize(x, (spec.shape[0], *x.shape[1:]))
        if np.issubdtype(spec.dtype, np.integer):
            from ..quantization.qdq import quantize_pow2

            quantize_pow2(src, spec.fix_point, out=slot)
        else:
            slot[...] = src
    backend.wait(backend.submit(slots[0], outs[0]))  # warm-up
    latencies: list[float] = []
    in_flight: deque = deque()
    t0 = time.perf_counter()
    for i in range(batches + 2):
        if len(in_flight) == 2 or (i >= batches and in_flight):
            ticket, ts = in_flight.popleft()  # the oldest: its slot is the one submitted to next
            backend.wait(ticket)
            latencies.append(time.perf_counter() - ts)
        if i < batches:
            in_flight.append((backend.submit(slots[i % 2], outs[i % 2]), time.perf_counter()))
    elapsed = time.perf_counter() - t0
    return {"frames_per_s": batches * spec.shape[0] / elapsed, "batch": spec.shape[0],
            "latency_p50_ms": float(np.percentile(latencies, 50) * 1e3),
            "latency_p99_ms": float(np.percentile(latencies, 99) * 1e3)}


def main(argv: list[str] | None = None) -> int:
    from ..hw.base import BackendUnavailable
    from ..hw.registry import backend_class, open_backend
    from ..quantization.qdq import synthetic_patterns

    ap = argparse.ArgumentParser(prog="python -m edgeptycho.tools.hil", description=__doc__.splitlines()[0])
    ap.add_argument("--backend", required=True)
    ap.add_argument("--model", default="default", help="zoo name or .onnx path (alveo: .xmodel beside it)")
    ap.add_argument("--precision", help="default: the backend's first precision")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--frames", type=int, default=64, help="reference frames compared")
    ap.add_argument("--batches", type=int, default=200, help="batches timed for throughput/latency")
    ap.add_argument("--data", help=".npy of preprocessed frames (n, 1, N, N); default: synthetic patterns")
    ap.add_argument("--option", action="append", default=[], help="backend option key=value (JSON value)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    precision = args.precision or backend_class(args.backend).precisions[0]  # ValueError names unknown ones
    try:
        backend = open_backend(args.backend, args.model, args.batch, precision, **_options(args.option))
    except BackendUnavailable as exc:
        print(f"hil: {exc}", file=sys.stderr)
        return 2
    with backend:
        ref_model = backend.model_path
        if ref_model.suffix == ".xmodel":
            ref_model = ref_model.with_suffix(".onnx")
        with open_backend("cpu", ref_model, args.batch) as cpu:
            size = cpu.input_spec.shape[-1]
            x = (np.load(args.data, allow_pickle=False).astype(np.float32) if args.data
                 else synthetic_patterns(args.frames, size, seed=1))
            ref = cpu.infer(x)
        report: dict[str, Any] = {"backend": args.backend, "precision": precision, "model": str(backend.model_path),
                                  "frames": len(x), "tolerance": TOLERANCES[precision]}
        report["agreement"] = agreement(ref, backend.infer(x), precision)
        report["telemetry_idle"] = backend.telemetry()
        report["speed"] = throughput(backend, x, args.batches)
        report["telemetry_loaded"] = backend.telemetry()
    ok = all(v["ok"] for v in report["agreement"].values())
    report["ok"] = ok
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(f"{args.backend} ({precision}) on {Path(report['model']).name}: {len(x)} frames vs cpu fp32")
        for name, a in report["agreement"].items():
            print(f"  {name:<10} max {a['max']:.2e}  rms {a['rms']:.2e} (of range {a['range']:.3g})  "
                  f"{'ok' if a['ok'] else 'DISAGREES'}")
        s = report["speed"]
        print(f"  {s['frames_per_s']:.0f} frames/s at batch {s['batch']}; batch latency p50 "
              f"{s['latency_p50_ms']:.2f} ms, p99 {s['latency_p99_ms']:.2f} ms")
        tel = report["telemetry_loaded"]
        print(f"  power: {tel.get('power_w')} W ({tel.get('source', '?')})"
              + (f"; {tel['unavailable']}" if tel.get("unavailable") else ""))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
