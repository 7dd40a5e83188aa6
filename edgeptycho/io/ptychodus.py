"""ptychodus product files (HDF5 and NPZ) read into a Reconstruction, and written for round-trip tests.

Layout, from ptychodus' plugins/h5_product_file.py and npz_product_file.py (we have no ptychodus install:
the writer below follows that layout by hand, and the tests read what it writes):
  HDF5: root attrs name, comments, detector_object_distance_m, probe_energy_eV, probe_photon_count,
        exposure_time_s, mass_attenuation_m2_kg, tomography_angle_deg; datasets probe_position_indexes,
        probe_position_x_m, probe_position_y_m, probe (OPR × modes × H × W, attrs pixel_width_m,
        pixel_height_m), object (layers × H × W complex, attrs center_x_m, center_y_m, pixel_width_m,
        pixel_height_m), object_layer_spacing_m, loss_epochs, loss_values (older files: costs).
  NPZ:  the same as flat keys; the probe and object attrs become probe_pixel_{width,height}_m,
        object_center_{x,y}_m and object_pixel_{width,height}_m.
Geometry: ptychodus maps object pixel coordinate (row, col) to
(center_y + dy·(row − H/2), center_x + dx·(col − W/2)), so our origin_m = centre − (H/2·dy, W/2·dx).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..physics.fourier import EV
from ..physics.types import Reconstruction

_ROOT_ATTRS = ("name", "comments", "detector_object_distance_m", "probe_energy_eV", "probe_photon_count",
               "exposure_time_s", "mass_attenuation_m2_kg", "tomography_angle_deg")
_ARRAY_ATTRS = {"probe": ("pixel_width_m", "pixel_height_m"),
                "object": ("center_x_m", "center_y_m", "pixel_width_m", "pixel_height_m")}
_H5_SUFFIXES = (".h5", ".hdf5")


def _flat_h5(path: Path) -> dict[str, Any]:
    """An HDF5 product as the NPZ product's flat keys, so both formats share one reader."""
    out: dict[str, Any] = {}
    with h5py.File(path, "r") as f:
        for key, value in f.attrs.items():
            out[key] = value.decode() if isinstance(value, bytes) else value
        for key, ds in f.items():
            if isinstance(ds, h5py.Dataset):
                out[key] = ds[()]
        for array, attrs in _ARRAY_ATTRS.items():
            if array in f:
                for a in attrs:
                    if a in f[array].attrs:
                        out[f"{array}_{a}"] = f[array].attrs[a]
    return out


def _load(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such ptychodus product file: {path}")
    if path.suffix.lower() in _H5_SUFFIXES:
        data = _flat_h5(path)
    elif path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    else:
        raise ValueError(f"{path}: a ptychodus product is .h5, .hdf5 or .npz, got '{path.suffix}'")
    if "object" not in data:
        raise ValueError(f"{path}: not a ptychodus product (no 'object' array)")
    missing = [k for k in ("object_pixel_width_m", "object_center_x_m", "object_center_y_m") if k not in data]
    if missing:
        raise ValueError(f"{path}: ptychodus product lacks {', '.join(missing)}")
    return data


def product_metadata(path: str | Path) -> dict[str, Any]:
    """The product's scalar metadata (name, comments, detector distance, energy in eV and J, …)."""
    data = _load(path)
    meta: dict[str, Any] = {}
    for key in _ROOT_ATTRS:
        if key in data:
            value = np.asarray(data[key]).item()
            meta[key] = value.decode() if isinstance(value, bytes) else value
    if "probe_energy_eV" in meta:
        meta["probe_energy_J"] = float(meta["probe_energy_eV"]) * EV
    return meta


def read_product(path: str | Path) -> Reconstruction:
    """Read a ptychodus product (.h5/.hdf5 or .npz): object, probe, positions, loss history.

    A multislice object becomes the product of its layers (the projected transmission); an OPR probe
    sequence becomes its first (mean) probe, modes kept as (K, H, W).
    """
    data = _load(path)
    obj = np.asarray(data["object"])
    if obj.ndim == 3:
        obj = np.prod(obj, axis=0)
    dx = float(data["object_pixel_width_m"])
    dy = float(data.get("object_pixel_height_m", dx))
    if not np.isclose(dx, dy, rtol=1e-6):
        raise ValueError(f"{path}: non-square object pixels ({dx} x {dy} m) are not supported")
    h, w = obj.shape
    origin = (float(data["object_center_y_m"]) - dy * h / 2, float(data["object_center_x_m"]) - dx * w / 2)
    x = np.asarray(data.get("probe_position_x_m", ()), dtype=np.float64)
    y = np.asarray(data.get("probe_position_y_m", ()), dtype=np.float64)
    probe = None
    if "probe" in data:
        probe = np.asarray(data["probe"])
        probe = probe[0] if probe.ndim == 4 else probe
        probe = probe[None] if probe.ndim == 2 else probe
    loss = data.get("loss_values", data.get("costs"))
    meta = {k: str(np.asarray(data[k]).item()) for k in ("name", "comments") if k in data}
    return Reconstruction(object=obj, pixel_m=dx, positions_m=np.stack([y, x], axis=1), probe=probe,
                          origin_m=origin, convergence=None if loss is None else np.asarray(loss, np.float64),
                          program={"program": "ptychodus", "source": str(path), **meta})


def write_product(path: str | Path, recon: Reconstruction, *, energy_J: float, distance_m: float,
                  name: str = "edgeptycho", comments: str = "", exposure_time_s: float = 0.0,
                  probe_photon_count: float = 0.0) -> Path:
    """Write a Reconstruction as a ptychodus product (.h5/.hdf5 or .npz by suffix), in ptychodus' layout."""
    path = Path(path)
    h, w = recon.object.shape
    dx = float(recon.pixel_m)
    positions = np.asarray(recon.positions_m, dtype=np.float64).reshape(-1, 2)
    probe = recon.probe if recon.probe is not None else np.ones((1, 1, 1), np.complex64)
    loss = np.asarray(recon.convergence if recon.convergence is not None else (), dtype=np.float64)
    root = {"name": name, "comments": comments, "detector_object_distance_m": float(distance_m),
            "probe_energy_eV": float(energy_J) / EV, "probe_photon_count": float(probe_photon_count),
            "exposure_time_s": float(exposure_time_s), "mass_attenuation_m2_kg": 0.0,
            "tomography_angle_deg": 0.0}
    arrays = {"probe_position_indexes": np.arange(len(positions)),
              "probe_position_x_m": positions[:, 1], "probe_position_y_m": positions[:, 0],
              "probe": np.asarray(probe)[None], "object": np.asarray(recon.object)[None],
              "object_layer_spacing_m": np.zeros(0), "loss_epochs": np.arange(len(loss)), "loss_values": loss}
    attrs = {"probe": {"pixel_width_m": dx, "pixel_height_m": dx},
             "object": {"center_x_m": recon.origin_m[1] + dx * w / 2, "center_y_m": recon.origin_m[0] + dx * h / 2,
                        "pixel_width_m": dx, "pixel_height_m": dx}}
    if path.suffix.lower() in _H5_SUFFIXES:
        with h5py.File(path, "w") as f:
            f.attrs.update(root)
            for key, value in arrays.items():
                ds = f.create_dataset(key, data=value)
                ds.attrs.update(attrs.get(key, {}))
    elif path.suffix.lower() == ".npz":
        flat = {f"{array}_{k}": v for array, a in attrs.items() for k, v in a.items()}
        np.savez(path, **root, **arrays, **flat)
    else:
        raise ValueError(f"{path}: a ptychodus product is .h5, .hdf5 or .npz, got '{path.suffix}'")
    return path
