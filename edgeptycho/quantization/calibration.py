"""Calibration data: patterns from a CXI scan (experimental or simulated) or a fresh simulation, preprocessed
exactly as inference does, plus the FP32 activation statistics of a model over them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .qdq import CALIBRATION_BATCH

SIM_PREFIX = "sim:"
SMALL_FRAME = 64  # the `small` simulation preset's frame size (the tiny model's geometry)


@dataclass
class CalibrationData:
    """Preprocessed model input x (n, 1, N, N) float32 and a JSON-able description of where it came from."""

    x: np.ndarray
    spec: dict[str, Any] = field(default_factory=dict)


def simulation_spec(kind: str, frame_size: int, n_positions: int | None = None):
    """A simulation preset for object `kind` at the model's frame size: the kind's own preset for 256-px frames,
    the `small` preset (64-px frames, 10 nm pixels) with that object for 64-px frames."""
    from ..physics.objects import OBJECT_KINDS
    from ..physics.simulate import PRESET_NAMES, preset

    if kind not in OBJECT_KINDS and kind not in PRESET_NAMES:
        raise ValueError(f"unknown object kind or preset '{kind}'; known: {', '.join(OBJECT_KINDS)}, small")
    if kind in PRESET_NAMES and preset(kind).geometry.frame_size == frame_size:
        spec = preset(kind)
    elif frame_size == SMALL_FRAME:
        spec = preset("small")
        if kind in OBJECT_KINDS:
            params = spec.object.params if kind == "siemens-star" else {}
            spec = spec.replace(object={"kind": kind, "params": dict(params)}, name=f"small-{kind}")
    else:
        raise ValueError(f"no simulation preset with {frame_size}-px frames; pass a CXI scan instead")
    if n_positions:
        spec = spec.replace(scan={"n_positions": int(n_positions)})
    return spec


def parse_source(source: str | Path) -> tuple[str, str, int]:
    """'sim:KIND[:SEED]' → ("sim", KIND, SEED); a path → ("cxi", path, 0)."""
    s = str(source)
    if not s.startswith(SIM_PREFIX):
        return "cxi", s, 0
    parts = s[len(SIM_PREFIX):].split(":")
    if not parts[0] or len(parts) > 2:
        raise ValueError(f"simulated calibration source must be 'sim:KIND[:SEED]', got '{s}'")
    try:
        seed = int(parts[1]) if len(parts) == 2 else 1000
    except ValueError as exc:
        raise ValueError(f"seed in '{s}' is not an integer") from exc
    return "sim", parts[0], seed


def pick_indices(n_frames: int, n: int) -> np.ndarray:
    """`n` frame indices spread evenly over the scan (all of them when the scan is shorter)."""
    if n < 1:
        raise ValueError(f"number of calibration patterns must be >= 1, got {n}")
    if n >= n_frames:
        return np.arange(n_frames)
    return np.unique(np.linspace(0, n_frames - 1, n).round().astype(np.int64))


def load_calibration(source: str | Path, artifact: Any, n: int = 512,
                     progress: Callable[[int], Callable[[int], None]] | None = None) -> CalibrationData:
    """Calibration patterns for `artifact` (a ModelArtifact) from a CXI scan path or 'sim:KIND[:SEED]'.

    Frames are read in scan order, `n` of them spread over the scan, and preprocessed with the model's own
    PreprocessSpec through preprocess_into (mask applied) — the inference path, byte for byte.
    `progress(total)` returns a per-pattern callback.
    """
    from ..model.artifact import sha256_file
    from ..model.preprocess import preprocess_into

    kind, what, seed = parse_source(source)
    frame_size = int(artifact.metadata.get("frame_size", 0)) or None
    prep = artifact.preprocess
    if kind == "sim":
        from ..physics.simulate import simulate

        if frame_size is None:
            raise ValueError(f"model '{artifact.name}' metadata has no frame_size; simulate with a CXI scan")
        spec = simulation_spec(what, frame_size)
        if n < spec.scan.n_positions:  # simulate only the patterns calibration will use
            spec = spec.replace(scan={"n_positions": int(n)})
        scan = simulate(spec, seed=seed)
        desc = {"source": "simulation", "spec": spec.name, "kind": spec.object.kind, "seed": seed}
        frames_ds, mask, total = scan.frames, scan.mask, scan.n_frames
        closer = None
    else:
        from ..io.cxi import open_scan

        path = Path(what)
        closer = open_scan(path)
        frames_ds, mask, total = closer.frames, closer.mask, closer.n_frames
        desc = {"source": "cxi", "path": str(path), "file_sha256": sha256_file(path)}
    try:
        fs = int(frames_ds.shape[-1])
        if frame_size is not None and fs != frame_size:
            raise ValueError(f"model '{artifact.name}' was trained on {frame_size}-px frames; the calibration "
                             f"scan has {fs}-px frames")
        size = prep.input_size(fs)
        if size != artifact.input_size:
            raise ValueError(f"preprocessing {prep.to_dict()} gives {size}-px input from {fs}-px frames; "
                             f"model input is {artifact.input_size}")
        idx = pick_indices(total, n)
        tick = progress(len(idx)) if progress else None
        x = np.empty((len(idx), 1, size, size), np.float32)
        for s in range(0, len(idx), 64):  # chunks: bounded memory for large frames on disk
            chunk = idx[s:s + 64]
            preprocess_into(np.asarray(frames_ds[chunk]), x[s:s + len(chunk)], prep, mask)
            if tick:
                tick(len(chunk))
    finally:
        if closer is not None:
            closer.close()
    desc.update({"n": int(len(idx)), "n_requested": int(n), "scan_frames": int(total),
                 "selection": "evenly spaced in scan order", "preprocess": prep.to_dict()})
    return CalibrationData(x, desc)


def calibration_reader(x: np.ndarray, input_name: str, batch: int = CALIBRATION_BATCH):
    """An onnxruntime.quantization CalibrationDataReader over `x` (for ORT's own calibrators and tools)."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.i = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.i >= len(x):
                return None
            out = {input_name: x[self.i:self.i + batch]}
            self.i += batch
            return out

        def rewind(self) -> None:
            self.i = 0

    return _Reader()


def run_intermediates(model, x: np.ndarray, names: list[str], batch: int = 16,
                      each: Callable[[dict[str, np.ndarray]], None] | None = None,
                      progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray] | None:
    """Run `model` (ModelProto) on `x` with tensors `names` exposed; call `each` per batch, or return all."""
    from .graph import expose, session

    sess = session(expose(model, names))
    input_name = model.graph.input[0].name
    kept: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for s in range(0, len(x), batch):
        res = sess.run(None, {input_name: np.ascontiguousarray(x[s:s + batch], np.float32)})
        outs = dict(zip([o.name for o in sess.get_outputs()], res, strict=True))
        got = {k: outs[k] for k in names}
        if each is not None:
            each(got)
        else:
            for k in names:
                kept[k].append(got[k])
        if progress:
            progress(min(batch, len(x) - s))
    return None if each is not None else {k: np.concatenate(v) for k, v in kept.items()}


def collect_observers(model, x: np.ndarray, tensors: list[str], observer: str, batch: int = 16,
                      progress: Callable[[int], None] | None = None) -> dict:
    """One observer per tensor, fed every calibration batch of the FP32 `model` (ModelProto)."""
    from .observers import make_observer

    obs = {t: make_observer(observer) for t in tensors}

    def feed(got: dict[str, np.ndarray]) -> None:
        for k, v in got.items():
            obs[k].update(v)

    run_intermediates(model, x, tensors, batch, each=feed, progress=progress)
    return obs
