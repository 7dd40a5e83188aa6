"""Scan trajectories (raster, concentric rings, Fermat spiral) in object pixels, and the object extent they need."""

from __future__ import annotations

import numpy as np

SCAN_KINDS = ("raster", "spiral", "concentric")

_GOLDEN_ANGLE = np.pi * (3.0 - np.sqrt(5.0))


def step_from_overlap(probe_diameter_px: float, overlap: float) -> float:
    """Scan step (px) giving linear `overlap` = 1 − step/diameter between neighbouring probe positions."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if probe_diameter_px <= 0:
        raise ValueError(f"probe diameter must be positive, got {probe_diameter_px} px")
    return float(probe_diameter_px) * (1.0 - overlap)


def _raster(n: int, step: float) -> np.ndarray:
    rows = max(1, int(round(np.sqrt(n))))
    cols = int(np.ceil(n / rows))
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return np.stack([r.ravel(), c.ravel()], axis=1)[:n] * step


def _spiral(n: int, step: float) -> np.ndarray:
    # Fermat spiral r = c√k, θ = k·golden angle: uniform density π c² per point; matching the area per point
    # of a hexagonal lattice of spacing `step` (√3/2·step²) gives c = step·√(√3 / 2π).
    c = step * np.sqrt(np.sqrt(3.0) / (2.0 * np.pi))
    k = np.arange(n)
    rad = c * np.sqrt(k)
    return np.stack([rad * np.sin(k * _GOLDEN_ANGLE), rad * np.cos(k * _GOLDEN_ANGLE)], axis=1)


def _concentric(n: int, step: float) -> np.ndarray:
    pts = [np.zeros((1, 2))]
    count, ring = 1, 1
    while count < n:  # ring j of radius j·step holds round(2πj) points, spaced ≈ step along the ring
        m = int(round(2.0 * np.pi * ring))
        ang = 2.0 * np.pi * np.arange(m) / m
        pts.append(ring * step * np.stack([np.sin(ang), np.cos(ang)], axis=1))
        count += m
        ring += 1
    return np.concatenate(pts)[:n]


def make_scan(kind: str, n_positions: int, step_px: float, jitter_px: float = 0.0,
              seed: int | np.random.Generator | None = 0, window: int | None = None, margin: int = 0) -> np.ndarray:
    """(N, 2) float64 scan centres (row, col) in object pixels.

    kind: raster (row by row), spiral (Fermat) or concentric (rings). `jitter_px` adds uniform sub-pixel-or-more
    noise in [−jitter, +jitter] per axis (breaks the raster-grid pathology of regular scans). With `window`
    (the probe window size n), the scan is translated so every window starts at least `margin` pixels
    inside the object (minimum centre = margin + n//2); object_shape_for_scan then gives the object size.
    """
    if kind not in SCAN_KINDS:
        raise ValueError(f"unknown scan kind {kind!r}; choose one of {', '.join(SCAN_KINDS)}")
    if n_positions < 1:
        raise ValueError(f"n_positions must be >= 1, got {n_positions}")
    if not np.isfinite(step_px) or step_px <= 0:
        raise ValueError(f"scan step must be positive, got {step_px} px")
    if jitter_px < 0:
        raise ValueError(f"jitter_px must be >= 0, got {jitter_px}")
    pos = {"raster": _raster, "spiral": _spiral, "concentric": _concentric}[kind](int(n_positions), float(step_px))
    if jitter_px > 0:
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        pos = pos + rng.uniform(-jitter_px, jitter_px, pos.shape)
    if window is not None:
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        pos = pos - pos.min(axis=0) + (margin + window // 2)
    return pos.astype(np.float64)


def object_shape_for_scan(positions_px: np.ndarray, window: int, margin: int = 0) -> tuple[int, int]:
    """Smallest object (H, W) holding every n×n window around `positions_px` plus `margin` on the far sides.

    A window centred at p covers rows floor(p) − n//2 … floor(p) − n//2 + n − 1 (the forward model's integer
    placement, the sub-pixel rest being applied to the probe). Raises if a window starts before pixel 0.
    """
    pos = np.asarray(positions_px, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2 or len(pos) == 0:
        raise ValueError(f"positions must be (N, 2), got {pos.shape}")
    lo = np.floor(pos.min(axis=0)) - window // 2
    if (lo < 0).any():
        raise ValueError(f"scan windows start at {lo.tolist()} (< 0): translate the scan (make_scan window=)")
    hi = np.floor(pos.max(axis=0)) - window // 2 + window + margin
    return int(hi[0]), int(hi[1])
