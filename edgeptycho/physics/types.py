"""Domain data types shared by physics, io, model and pipeline: a ptychographic scan and a reconstruction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .fourier import object_pixel_size, wavelength_from_energy


@dataclass
class ScanData:
    """A raw ptychographic scan, SI units, as read from or written to a CXI file.

    frames (N, H, W) detector counts, zero frequency at the centre. positions_m (N, 2) as (y, x) = (row, col)
    in metres, in the frame of the ground-truth object when there is one: object pixel (r, c) sits at
    (r·dx, c·dx) and a position is the centre of the N×N probe window (window index H//2).
    probe (K, H, W) complex incoherent modes at the object pixel size, or None.
    """

    frames: np.ndarray
    positions_m: np.ndarray
    energy_J: float
    distance_m: float
    detector_pixel_m: float
    mask: np.ndarray | None = None          # (H, W) uint32, nonzero = invalid pixel
    probe: np.ndarray | None = None          # (K, H, W) complex
    object_truth: np.ndarray | None = None   # complex ground truth at object_pixel_m, if simulated
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.frames.ndim != 3:
            raise ValueError(f"frames must be (N, H, W), got shape {self.frames.shape}")
        if self.positions_m.shape != (self.frames.shape[0], 2):
            raise ValueError(f"positions_m must be ({self.frames.shape[0]}, 2), got {self.positions_m.shape}")
        if self.probe is not None and self.probe.ndim == 2:
            self.probe = self.probe[None]

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def frame_size(self) -> int:
        return int(self.frames.shape[-1])

    @property
    def wavelength_m(self) -> float:
        return wavelength_from_energy(self.energy_J)

    @property
    def object_pixel_m(self) -> float:
        return object_pixel_size(self.wavelength_m, self.distance_m, self.frame_size, self.detector_pixel_m)

    def positions_px(self, pixel_m: float | None = None) -> np.ndarray:
        """Positions (N, 2) (row, col) in object pixels of size `pixel_m` (default: the full-frame pixel)."""
        return self.positions_m / (pixel_m or self.object_pixel_m)


@dataclass
class Reconstruction:
    """A reconstructed object (and probe) on a grid whose pixel (r, c) sits at (r·dx, c·dx) + origin_m."""

    object: np.ndarray                       # (H, W) complex
    pixel_m: float
    positions_m: np.ndarray                  # (N, 2) (y, x) m, same frame as ScanData
    probe: np.ndarray | None = None          # (K, h, w) complex
    origin_m: tuple[float, float] = (0.0, 0.0)
    metrics: dict[str, float] = field(default_factory=dict)
    convergence: np.ndarray | None = None    # per-iteration Fourier misfit
    uncertainty: np.ndarray | None = None    # (H, W) phase standard deviation, rad
    program: dict[str, str] = field(default_factory=dict)  # program, version, command

    @property
    def amplitude(self) -> np.ndarray:
        return np.abs(self.object)

    @property
    def phase(self) -> np.ndarray:
        return np.angle(self.object)
