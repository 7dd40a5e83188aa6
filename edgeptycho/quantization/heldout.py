"""Held-out evaluation of the deployment schemes: calibrate each, reconstruct fresh simulated scans of every
object kind on its emulating backend, and compare with FP32 and the ground truth (the quant-report)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .schemes import DEFAULT_OBSERVER, SCHEMES

DEFAULT_SCHEMES = ("fp16", "trt-int8", "dpu-pow2")
# Allowed |phase NRMSE(scheme) − phase NRMSE(FP32)| against the truth, per held-out scan.
BUDGETS = {"fp16": 0.001, "trt-int8": 0.005, "dpu-pow2": 0.005}
CAL_SEED = 2000    # calibration scans: seeds CAL_SEED + k …
SCAN_SEED = 9000   # … held-out scans SCAN_SEED + k: never the same patterns
DEFAULT_POSITIONS = 100


def calibration_set(artifact: Any, n: int, source: str | Path | None = None,
                    progress: Callable[[str, int], Callable[[int], None]] | None = None):
    """Calibration patterns: from `source` (CXI or sim:KIND[:SEED]), else n/4 from a simulated scan of each
    object kind (seeds CAL_SEED + k), concatenated."""
    from ..physics.objects import OBJECT_KINDS
    from .calibration import CalibrationData, load_calibration

    tick = (lambda total: progress("calibration patterns", total)) if progress else None
    if source is not None:
        return load_calibration(source, artifact, n, tick)
    parts = [load_calibration(f"sim:{k}:{CAL_SEED + i}", artifact, max(1, n // len(OBJECT_KINDS)), tick)
             for i, k in enumerate(OBJECT_KINDS)]
    desc = {"source": "simulation", "scans": [p.spec for p in parts], "n": int(sum(len(p.x) for p in parts)),
            "description": f"simulated {', '.join(OBJECT_KINDS)}, seeds {CAL_SEED}+"}
    return CalibrationData(np.concatenate([p.x for p in parts]), desc)


def heldout_scans(artifact: Any, scans: list[str | Path] | None = None, positions: int | None = None,
                  seed: int = SCAN_SEED) -> dict[str, tuple[Any, str]]:
    """name → (ScanData with ground truth, where it came from): the given CXI files, or one fresh simulation
    per object kind at the model's frame size (seeds `seed` + k)."""
    from ..io.cxi import read_scan
    from ..physics.objects import OBJECT_KINDS
    from ..physics.simulate import simulate
    from .calibration import simulation_spec

    out: dict[str, tuple[Any, str]] = {}
    if scans:
        for p in scans:
            scan = read_scan(p)
            if scan.object_truth is None:
                raise ValueError(f"{p}: held-out scans need ground truth (a simulated CXI scan)")
            out[Path(p).stem] = (scan, str(p))
        return out
    frame = int(artifact.metadata.get("frame_size", 0))
    for i, kind in enumerate(OBJECT_KINDS):
        spec = simulation_spec(kind, frame)
        n_pos = positions or (DEFAULT_POSITIONS if spec.scan.n_positions > DEFAULT_POSITIONS else None)
        if n_pos:
            spec = spec.replace(scan={"n_positions": int(n_pos)})
        out[kind] = (simulate(spec, seed=seed + i), f"{spec.name} seed {seed + i}, {spec.scan.n_positions} positions")
    return out


def _scores(recon: Any, scan: Any) -> dict[str, float]:
    from ..physics.metrics import evaluate

    m = evaluate(recon, scan)
    return {"phase_nrmse": m["phase_nrmse"], "complex_nrmse": m["complex_nrmse"],
            "frc_nm": m["frc_half_pitch_m"] * 1e9, "frc_crossed": m["frc_crossed"]}


def _phase_spread(model_path: Path, x: np.ndarray) -> float:
    """Std of the FP32 model's phase output over patterns `x`: the signal the schemes' errors compare with."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return float(np.std(sess.run(["phase"], {sess.get_inputs()[0].name: x})[0]))


def layer_patterns(scans: dict[str, tuple[Any, str]], artifact: Any, n: int) -> np.ndarray:
    """`n` preprocessed patterns spread over all held-out scans (for the per-layer report)."""
    from ..model.preprocess import preprocess
    from .calibration import pick_indices

    per = max(1, n // len(scans))
    return np.concatenate([preprocess(np.asarray(s.frames[pick_indices(s.n_frames, per)]), artifact.preprocess,
                                      s.mask) for s, _ in scans.values()])


def quant_report(model: str | Path, out: str | Path, scans: list[str | Path] | None = None,
                 schemes: tuple[str, ...] = DEFAULT_SCHEMES, observer: str = DEFAULT_OBSERVER, n_cal: int = 256,
                 calibration: str | Path | None = None, positions: int | None = None, n_layer: int = 32,
                 batch: int = 32, progress: Callable[[str, int], Callable[[int], None]] | None = None,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Calibrate every scheme, reconstruct the held-out scans with each, write report.md + plots in `out`."""
    from ..commands.reconstruct import reconstruct_scan
    from ..model.artifact import ModelArtifact
    from .dpu_emulator import DpuEmulator
    from .report import comparison_mask, layer_report, versus_fp32, write_report
    from .schemes import calibrate_artifact

    out = Path(out)
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        raise ValueError(f"unknown scheme(s) {unknown}; known: {', '.join(SCHEMES)}")
    parent = ModelArtifact.load(model)
    cal = calibration_set(parent, n_cal, calibration, progress)
    log(f"calibration: {len(cal.x)} patterns")
    arts = {}
    for sch in schemes:
        arts[sch], _ = calibrate_artifact(parent.path, sch, out / "models" / f"{parent.name}-{sch}.onnx", cal,
                                          observer=observer,
                                          progress=progress)
    held = heldout_scans(parent, scans, positions)
    summary: dict[str, Any] = {
        "model": {"name": parent.name, "path": str(parent.path), "sha256": parent.sha256},
        "schemes": list(schemes), "observer": observer,
        "calibration": {"n": int(len(cal.x)), "description": cal.spec.get("description") or
                        f"{cal.spec.get('source')} {cal.spec.get('path', cal.spec.get('spec', ''))}"},
        "scan_sources": {k: v[1] for k, v in held.items()}, "scans": {}}
    maps: dict[str, dict[str, np.ndarray]] = {}
    for name, (scan, _) in held.items():
        # Every scheme and the FP32 reference are stitched alike, with the global phase ramp removed as it is
        # for an int8 model in use: the deltas are then the quantization's alone, not the ramp policy's.
        ref, _t = reconstruct_scan(scan, parent.path, "cpu", batch, "fp32", remove_ramp=True)
        row = {"fp32": _scores(ref, scan)}
        mask = comparison_mask(ref, scan)
        maps[name] = {}
        for sch in schemes:
            info = SCHEMES[sch]
            recon, _t = reconstruct_scan(scan, arts[sch].path, info.backend, batch, info.precision, remove_ramp=True)
            vs = versus_fp32(recon, ref, mask)
            maps[name][sch] = vs.pop("error_map")
            row[sch] = {**_scores(recon, scan), **vs}
        summary["scans"][name] = row
        log(f"{name}: " + ", ".join(f"{s} {row[s]['phase_nrmse']:.4f}" for s in row))
    summary["aggregate"] = {}
    for sch in schemes:
        d = [r[sch]["phase_nrmse"] - r["fp32"]["phase_nrmse"] for r in summary["scans"].values()]
        dn = [r[sch]["frc_nm"] - r["fp32"]["frc_nm"] for r in summary["scans"].values()]
        summary["aggregate"][sch] = {"delta_phase_nrmse_mean": float(np.mean(d)),
                                     "delta_phase_nrmse_max": float(np.max(np.abs(d))),
                                     "delta_frc_nm_mean": float(np.nanmean(dn)), "budget": BUDGETS.get(sch),
                                     "met": bool(np.max(np.abs(d)) <= BUDGETS.get(sch, np.inf))}
    x = layer_patterns(held, parent, n_layer)
    summary["fp32_phase_std_rad"] = _phase_spread(parent.path, x)
    layers = {sch: layer_report(parent.path, arts[sch].path, sch, x) for sch in schemes}
    emulator = None
    if "dpu-pow2" in arts:
        emu = DpuEmulator.load(arts["dpu-pow2"].path)
        cmp = emu.compare_with_ort(x)
        heads = [cmp[o.tensor] for o in emu.outputs]
        emulator = {"first": cmp[emu.ops[0].output], "per_tensor": cmp,
                    "heads_max_lsb": max(h["max_lsb"] for h in heads),
                    "heads_fraction_differing": float(np.mean([h["fraction_differing"] for h in heads])),
                    "accumulators": emu.accumulators}
    write_report(out, summary, maps, layers, emulator)
    return summary
