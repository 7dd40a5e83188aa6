"""CXI 1.6 files: raw scans (frames, geometry, probe, ground truth) and reconstructions, read and written.

Raw scan layout (SI units, `units` attributes on every physical quantity):
  cxi_version = 160
  entry_1/instrument_1/detector_1/{data (N, H, W) chunked per frame, distance, x_pixel_size, y_pixel_size,
                                   mask (H, W) uint32, bit 0x1 = invalid}
  entry_1/instrument_1/source_1/{energy (J), illumination (K, H, W) complex probe modes}
  entry_1/sample_1/geometry_1/translation (N, 3) = x, y, z in metres (probe position on the object)
  entry_1/data_1/{data, translation}      soft links to the two above; data carries axes = "translation:y:x"
  entry_1/sample_1/object_truth           complex ground truth (simulations), attrs x/y_pixel_size
  entry_1/image_truth/{data → object_truth, data_type, data_space, image_size, is_fft_shifted}
  entry_1/edgeptycho/metadata             JSON string (simulation spec, seed, dose, …)
Reconstruction layout: entry_1/image_1 the complex object (data_type "object"), entry_1/image_2 the probe
(axes "coherent:incoherent:y:x", also linked as source_1/illumination), entry_1/image_3 the phase
uncertainty when present, translation as above, entry_1/edgeptycho/{metrics (attrs), convergence}.
Every image_N carries image_size = (width, height, 0) m, as ptychodus writes it.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .. import __version__
from ..physics.types import Reconstruction, ScanData

log = logging.getLogger(__name__)

CXI_VERSION = 160
COMPRESSIONS = ("gzip", "lz4", "bslz4", "none")
MASK_INVALID = 0x1

DETECTOR = "entry_1/instrument_1/detector_1"
SOURCE = "entry_1/instrument_1/source_1"
TRANSLATION = "entry_1/sample_1/geometry_1/translation"
DATA_1 = "entry_1/data_1"
TRUTH = "entry_1/sample_1/object_truth"
IMAGE_TRUTH = "entry_1/image_truth"
OURS = "entry_1/edgeptycho"

_FRAME_PATHS = (f"{DETECTOR}/data", f"{DATA_1}/data")
_TRANSLATION_PATHS = (TRANSLATION, f"{DATA_1}/translation")
_UNIT_SCALE = {"m": 1.0, "mm": 1e-3, "um": 1e-6, "µm": 1e-6, "micron": 1e-6, "nm": 1e-9,
               "J": 1.0, "eV": 1.602176634e-19, "keV": 1.602176634e-16}


# ----------------------------------------------------------------------------------------------- helpers

def _compression(compression: str | None) -> dict[str, Any]:
    """h5py create_dataset keywords for a compression name; hdf5plugin is imported only when needed."""
    if compression in (None, "none"):
        return {}
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    if compression in ("lz4", "bslz4"):
        import hdf5plugin
        return dict(hdf5plugin.LZ4() if compression == "lz4" else hdf5plugin.Bitshuffle(cname="lz4"))
    raise ValueError(f"unknown compression {compression!r}; choose one of {', '.join(COMPRESSIONS)}")


def _register_filters() -> None:
    # Files from detectors and from our own writer use the LZ4/bitshuffle filters; importing hdf5plugin
    # registers them with HDF5 so reading works whatever wrote the file.
    import hdf5plugin  # noqa: F401


def jsonable(value: Any) -> Any:
    """Plain JSON types from numpy scalars/arrays, dataclasses and nested containers; NaN/inf → None."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if is_dataclass(value) and not isinstance(value, type):
        return jsonable(asdict(value))
    if isinstance(value, float) and not np.isfinite(value):
        return None  # strict JSON has no NaN
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _quantity(group: h5py.Group, name: str, value: float, units: str) -> None:
    ds = group.create_dataset(name, data=float(value))
    ds.attrs["units"] = units


def _unit_scale(ds: h5py.Dataset, default: str) -> float:
    """Factor to SI from the dataset's `units` attribute (CXI: SI unless a `units` attribute says otherwise)."""
    units = ds.attrs.get("units", default)
    units = units.decode() if isinstance(units, bytes) else str(units)
    if units not in _UNIT_SCALE:
        raise ValueError(f"{ds.name}: unsupported units {units!r} (known: {', '.join(_UNIT_SCALE)})")
    return _UNIT_SCALE[units]


def _read_si(f: h5py.File, path: str, default_units: str) -> float:
    """A scalar in SI units, honouring a `units` attribute written by another program."""
    ds = f[path]
    return float(np.asarray(ds[()]).reshape(-1)[0]) * _unit_scale(ds, default_units)


def _read_str(f: h5py.Group, path: str, default: str = "") -> str:
    if path not in f:
        return default
    value = f[path][()]
    return value.decode() if isinstance(value, bytes) else str(value)


def _first(f: h5py.File, paths: tuple[str, ...]) -> str | None:
    return next((p for p in paths if p in f and isinstance(f[p], h5py.Dataset)), None)


def _translation_xyz(positions_m: np.ndarray) -> np.ndarray:
    """(N, 2) (y, x) → CXI (N, 3) (x, y, z)."""
    xyz = np.zeros((len(positions_m), 3), dtype=np.float64)
    xyz[:, 0] = positions_m[:, 1]
    xyz[:, 1] = positions_m[:, 0]
    return xyz


def _positions_yx(f: h5py.File, path: str) -> np.ndarray:
    t = np.asarray(f[path][()], dtype=np.float64)
    if t.ndim != 2 or t.shape[1] < 2:
        raise ValueError(f"{path}: translation must be (N, 3) x, y, z, got shape {t.shape}")
    return np.ascontiguousarray(t[:, 1::-1]) * _unit_scale(f[path], "m")


def _modes(probe: np.ndarray) -> np.ndarray:
    """Any stored probe (H, W) | (K, H, W) | (OPR, K, H, W) → (K, H, W); OPR mode 0 is the mean probe."""
    probe = np.asarray(probe)
    if probe.ndim == 4:
        probe = probe[0]
    return probe[None] if probe.ndim == 2 else probe


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def _start(path: str | Path) -> h5py.File:
    f = h5py.File(path, "w")
    f.create_dataset("cxi_version", data=CXI_VERSION)
    f.create_dataset("entry_1/start_time", data=_now())
    return f


def _write_geometry(f: h5py.File, energy_J: float, distance_m: float, pixel_m: float) -> None:
    _quantity(f.require_group(SOURCE), "energy", energy_J, "J")
    det = f.require_group(DETECTOR)
    _quantity(det, "distance", distance_m, "m")
    _quantity(det, "x_pixel_size", pixel_m, "m")
    _quantity(det, "y_pixel_size", pixel_m, "m")


def _write_translation(f: h5py.File, positions_m: np.ndarray) -> None:
    ds = f.create_dataset(TRANSLATION, data=_translation_xyz(np.asarray(positions_m)))
    ds.attrs["units"] = "m"
    f.require_group(DATA_1)["translation"] = h5py.SoftLink("/" + TRANSLATION)


def _write_image(f: h5py.File, path: str, data: np.ndarray | str, data_type: str, pixel_m: float,
                 axes: str = "y:x") -> h5py.Group:
    """A CXI image_N-style group; `data` is an array, or the path of an existing dataset to soft-link."""
    g = f.create_group(path)
    if isinstance(data, str):
        g["data"] = h5py.SoftLink("/" + data)
        ds = f[data]
    else:
        ds = g.create_dataset("data", data=data)
        ds.attrs["axes"] = axes
    g.create_dataset("data_type", data=data_type)
    g.create_dataset("data_space", data="real")
    g.create_dataset("is_fft_shifted", data=0)
    h, w = ds.shape[-2:]
    size = g.create_dataset("image_size", data=np.array([w * pixel_m, h * pixel_m, 0.0]))
    size.attrs["units"] = "m"
    g.attrs["x_pixel_size"] = g.attrs["y_pixel_size"] = float(pixel_m)
    return g


def _write_json(f: h5py.File, path: str, value: dict[str, Any]) -> None:
    f.create_dataset(path, data=json.dumps(jsonable(value), sort_keys=True))


# -------------------------------------------------------------------------------------------- raw scans

def write_scan(path: str | Path, scan: ScanData, compression: str | None = "gzip") -> Path:
    """Write a raw scan (with probe, ground truth and metadata when present) as CXI 1.6; returns the path."""
    kwargs = _compression(compression)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n, h, w = scan.frames.shape
    with _start(path) as f:
        _write_geometry(f, scan.energy_J, scan.distance_m, scan.detector_pixel_m)
        det = f[DETECTOR]
        data = det.create_dataset("data", data=scan.frames, chunks=(1, h, w), **kwargs)
        data.attrs["axes"] = "translation:y:x"
        data.attrs["units"] = "counts"
        if scan.mask is not None:
            det.create_dataset("mask", data=np.asarray(scan.mask).astype(np.uint32), **_compression("gzip"))
        f.require_group(DATA_1)["data"] = h5py.SoftLink(f"/{DETECTOR}/data")
        _write_translation(f, scan.positions_m)
        dx = scan.object_pixel_m
        if scan.probe is not None:
            ill = f[SOURCE].create_dataset("illumination", data=_modes(scan.probe))
            ill.attrs["axes"] = "incoherent:y:x"
            ill.attrs["x_pixel_size"] = ill.attrs["y_pixel_size"] = dx
        if scan.object_truth is not None:
            truth = f.create_dataset(TRUTH, data=scan.object_truth, **_compression("gzip"))
            truth.attrs["x_pixel_size"] = truth.attrs["y_pixel_size"] = dx
            truth.attrs["description"] = "simulated ground-truth object; pixel (r, c) sits at (r*dy, c*dx) m"
            _write_image(f, IMAGE_TRUTH, TRUTH, "object (ground truth)", dx)
        ours = f.create_group(OURS)
        ours.attrs["version"] = __version__
        _write_json(f, f"{OURS}/metadata", scan.metadata)
    return path


@dataclass
class CXIScan(ScanData):
    """A ScanData read lazily: `frames` is the on-disk h5py dataset (for streaming replay of big files); the
    small fields are in memory. Valid until close(); use `with open_scan(path) as scan:`."""

    path: Path | None = None
    file: h5py.File | None = field(default=None, repr=False)

    def to_scan(self) -> ScanData:
        """An in-memory ScanData (frames read from disk)."""
        kept = {f.name: getattr(self, f.name) for f in fields(ScanData)}
        return ScanData(**{**kept, "frames": self.frames[()]})

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

    def __enter__(self) -> CXIScan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_scan_header(f: h5py.File, path: Path) -> dict[str, Any]:
    where = f"not a CXI scan ({path})"
    frames_path = _first(f, _FRAME_PATHS)
    if frames_path is None:
        raise ValueError(f"{where}: no frames at {' or '.join(_FRAME_PATHS)}")
    frames = f[frames_path]
    if frames.ndim != 3:
        raise ValueError(f"{where}: {frames_path} must be (N, H, W), got shape {frames.shape}")
    t_path = _first(f, _TRANSLATION_PATHS)
    if t_path is None:
        raise ValueError(f"{where}: no positions at {' or '.join(_TRANSLATION_PATHS)}")
    positions = _positions_yx(f, t_path)
    if len(positions) != len(frames):
        raise ValueError(f"{where}: {len(positions)} positions at {t_path} for {len(frames)} frames")
    for p in (f"{SOURCE}/energy", f"{DETECTOR}/distance", f"{DETECTOR}/x_pixel_size"):
        if p not in f:
            raise ValueError(f"{where}: missing {p}")
    pixel = _read_si(f, f"{DETECTOR}/x_pixel_size", "m")
    if f"{DETECTOR}/y_pixel_size" in f:
        dy = _read_si(f, f"{DETECTOR}/y_pixel_size", "m")
        if not np.isclose(dy, pixel, rtol=1e-6):
            log.warning("%s: non-square detector pixels (%g x %g m); using x_pixel_size", path, pixel, dy)
    mask = None
    if f"{DETECTOR}/mask" in f:
        mask = np.asarray(f[f"{DETECTOR}/mask"][()]).astype(np.uint32)
        if mask.shape != frames.shape[1:]:
            raise ValueError(f"{path}: mask shape {mask.shape} != frame shape {frames.shape[1:]}")
    return {
        "frames": frames, "positions_m": positions, "detector_pixel_m": pixel, "mask": mask,
        "energy_J": _read_si(f, f"{SOURCE}/energy", "J"),
        "distance_m": _read_si(f, f"{DETECTOR}/distance", "m"),
        "probe": _modes(f[f"{SOURCE}/illumination"][()]) if f"{SOURCE}/illumination" in f else None,
        "object_truth": f[TRUTH][()] if TRUTH in f else None,
        "metadata": json.loads(_read_str(f, f"{OURS}/metadata", "{}")),
    }


def open_scan(path: str | Path) -> CXIScan:
    """Open a CXI scan lazily (frames stay on disk); close it or use `with open_scan(p) as s:`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such CXI file: {path}")
    _register_filters()
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"{path}: not an HDF5/CXI file ({exc})") from exc
    try:
        return CXIScan(**_read_scan_header(f, path), path=path, file=f)
    except BaseException:
        f.close()
        raise


def read_scan(path: str | Path) -> ScanData:
    """Read a whole CXI scan into memory (ours, or another program's with the standard paths)."""
    with open_scan(path) as s:
        return s.to_scan()


# ---------------------------------------------------------------------------------------- reconstructions

def write_reconstruction(path: str | Path, recon: Reconstruction, scan: ScanData | None = None,
                         command: str = "") -> Path:
    """Write a reconstruction (object, probe, positions, metrics, convergence, uncertainty) as CXI 1.6.

    With `scan`, its beam geometry and metadata are recorded too (no frames).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dx = float(recon.pixel_m)
    with _start(path) as f:
        img = _write_image(f, "entry_1/image_1", np.asarray(recon.object), "object", dx)
        img.attrs["origin_y_m"], img.attrs["origin_x_m"] = (float(v) for v in recon.origin_m)
        proc = img.create_group("process_1")
        program = {"program": "edgeptycho", "version": __version__, "command": command, **recon.program}
        program.setdefault("date", _now())
        for key, value in program.items():
            proc.create_dataset(key, data=str(value))
        if recon.probe is not None:
            _write_image(f, "entry_1/image_2", _modes(recon.probe)[None], "probe", dx, "coherent:incoherent:y:x")
            f.require_group(SOURCE)["illumination"] = h5py.SoftLink("/entry_1/image_2/data")
        if recon.uncertainty is not None:
            g = _write_image(f, "entry_1/image_3", np.asarray(recon.uncertainty, dtype=np.float32),
                             "phase uncertainty", dx)
            g["data"].attrs["units"] = "rad"
        _write_translation(f, np.asarray(recon.positions_m).reshape(-1, 2))
        ours = f.create_group(OURS)
        ours.attrs["version"] = __version__
        metrics = ours.create_group("metrics")
        for key, value in recon.metrics.items():
            scalar = isinstance(value, (int, float, str, np.number))
            metrics.attrs[key] = value if scalar else json.dumps(jsonable(value))
        if recon.convergence is not None:
            ours.create_dataset("convergence", data=np.asarray(recon.convergence, dtype=np.float64))
        if scan is not None:
            _write_geometry(f, scan.energy_J, scan.distance_m, scan.detector_pixel_m)
            _write_json(f, f"{OURS}/scan_metadata", scan.metadata)
    return path


def _image_groups(f: h5py.File) -> list[str]:
    names = [k for k in f.get("entry_1", {}) if re.fullmatch(r"image_\d+", k)]
    return [f"entry_1/{k}" for k in sorted(names, key=lambda k: int(k.split("_")[1]))]


def _probe_image(f: h5py.File, images: list[str]) -> str | None:
    link = f[SOURCE].get("illumination", getlink=True) if SOURCE in f else None
    target = link.path.strip("/") if isinstance(link, h5py.SoftLink) else ""
    for g in images:
        axes = str(f[g]["data"].attrs.get("axes", ""))
        if target == f"{g}/data" or axes.startswith("coherent") or _read_str(f[g], "data_type") == "probe":
            return g
    return None


def _pixel_m(f: h5py.File, g: str, shape: tuple[int, ...]) -> float:
    if "x_pixel_size" in f[g].attrs:
        return float(f[g].attrs["x_pixel_size"])
    if "entry_1/ptychodus/object_pixel_width_m" in f:  # ptychodus' CXI product writer
        return float(f["entry_1/ptychodus/object_pixel_width_m"][()])
    if "image_size" in f[g]:
        return float(np.asarray(f[g]["image_size"][()]).reshape(-1)[0]) / shape[-1]
    raise ValueError(f"{g}: no pixel size (x_pixel_size attribute or image_size)")


def read_reconstruction(path: str | Path, allow_truth: bool = False) -> Reconstruction:
    """Read a CXI reconstruction (ours, or ptychodus' image_1 = probe / image_2 = object layout).

    allow_truth: a raw scan file without a reconstruction yields its ground-truth object instead.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such CXI file: {path}")
    _register_filters()
    with h5py.File(path, "r") as f:
        images = [g for g in _image_groups(f) if isinstance(f[g].get("data"), h5py.Dataset)]
        probe_g = _probe_image(f, images)
        objects = [g for g in images if g != probe_g and _read_str(f[g], "data_type") != "phase uncertainty"]
        if not objects:
            if TRUTH in f and allow_truth:
                return _truth_reconstruction(path)
            hint = (f" (a raw scan: its ground truth is at {TRUTH})" if TRUTH in f else "")
            raise ValueError(f"not a CXI reconstruction ({path}): no object image at entry_1/image_N/data{hint}")
        g = objects[0]
        obj = np.asarray(f[g]["data"][()])
        if obj.ndim == 3:  # multislice layers: their product is the projected transmission
            obj = np.prod(obj, axis=0)
        dx = _pixel_m(f, g, obj.shape)
        attrs = f[g].attrs
        if "origin_x_m" in attrs:
            origin = (float(attrs["origin_y_m"]), float(attrs["origin_x_m"]))
        elif "entry_1/ptychodus/object_center_x_m" in f:
            # ptychodus maps pixel coordinate c to centre_x + dx·(c − W/2)
            origin = (float(f["entry_1/ptychodus/object_center_y_m"][()]) - dx * obj.shape[0] / 2,
                      float(f["entry_1/ptychodus/object_center_x_m"][()]) - dx * obj.shape[1] / 2)
        else:
            origin = (0.0, 0.0)
        t_path = _first(f, _TRANSLATION_PATHS)
        positions = _positions_yx(f, t_path) if t_path else np.zeros((0, 2))
        proc = f"{g}/process_1" if f"{g}/process_1" in f else "entry_1/process_1"
        program = {k: _read_str(f, f"{proc}/{k}") for k in f[proc]} if proc in f else {}
        metrics: dict[str, Any] = {}
        if f"{OURS}/metrics" in f:
            metrics = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f[f"{OURS}/metrics"].attrs.items()}
        conv_path = _first(f, (f"{OURS}/convergence", "entry_1/ptychodus/loss_values"))
        unc = [u for u in images if _read_str(f[u], "data_type") == "phase uncertainty"]
        return Reconstruction(
            object=obj, pixel_m=dx, positions_m=positions, origin_m=origin,
            probe=_modes(f[probe_g]["data"][()]) if probe_g else None,
            metrics=metrics, convergence=f[conv_path][()] if conv_path else None,
            uncertainty=f[unc[0]]["data"][()] if unc else None, program=program)


def _truth_reconstruction(path: Path) -> Reconstruction:
    with open_scan(path) as s:
        return Reconstruction(object=s.object_truth, pixel_m=s.object_pixel_m, positions_m=s.positions_m,
                              probe=s.probe, program={"program": "ground truth", "source": str(path)})
