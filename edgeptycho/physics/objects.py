"""Synthetic complex test objects (Siemens star, IC layout, cells, natural textures), deterministic from a seed."""

from __future__ import annotations

import inspect

import numpy as np
import scipy.fft as sfft
from scipy.ndimage import gaussian_filter

OBJECT_KINDS = ("siemens-star", "ic", "cells", "texture")

# Per-kind defaults: (phase_range rad, amplitude_min). Cells are weak phase objects; the others are ~1.5 rad,
# under π so the default phase never wraps.
_DEFAULTS = {"siemens-star": (1.5, 0.7), "ic": (1.5, 0.6), "cells": (1.0, 0.95), "texture": (1.5, 0.7)}


def _to_complex(t_phase: np.ndarray, t_amp: np.ndarray, phase_range: float, amplitude_min: float) -> np.ndarray:
    """Projected thickness maps in [0, 1] → transmission amplitude·exp(iφ).

    Amplitude = amplitude_min ** t (Beer–Lambert, so 1 at t = 0 and amplitude_min at full thickness); phase is
    phase_range·(t − ½), centred on zero so that any range below 2π stays inside (−π, π] without wrapping.
    """
    amp = np.power(amplitude_min, np.clip(t_amp, 0.0, 1.0))
    phase = phase_range * (np.clip(t_phase, 0.0, 1.0) - 0.5)
    return (amp * np.exp(1j * phase)).astype(np.complex64)


def _normalise(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def siemens_star(shape: tuple[int, int], rng: np.random.Generator, n_spokes: int = 36,
                 radius_frac: float = 0.45) -> np.ndarray:
    """Thickness map of a Siemens star: `n_spokes` dark sectors, a rim, analytically antialiased edges.

    The spoke period shrinks linearly towards the centre, so the star carries every spatial frequency up to
    and beyond Nyquist: the classic resolution target. The seed only turns the star by a random angle.
    """
    h, w = shape
    y, x = np.indices(shape, dtype=np.float64)
    y -= (h - 1) / 2
    x -= (w - 1) / 2
    r = np.hypot(y, x)
    theta = np.arctan2(y, x) + rng.uniform(0, 2 * np.pi / n_spokes)
    s = np.sin(n_spokes * theta)
    # signed distance (px) to the nearest spoke edge ≈ s / |∇s|, |∇s| = n|cos(nθ)|/r: a one-pixel soft edge
    grad = n_spokes * np.maximum(np.abs(np.cos(n_spokes * theta)), 1e-3) / np.maximum(r, 0.5)
    spokes = np.clip(0.5 + s / grad, 0.0, 1.0)
    radius = radius_frac * min(h, w)
    inside = np.clip(radius + 0.5 - r, 0.0, 1.0)
    rim = np.clip(1.0 - np.abs(r - radius - 3.0) / 2.0, 0.0, 1.0)  # a 4-px ring framing the star
    return np.maximum(spokes * inside, rim)


def ic_layout(shape: tuple[int, int], rng: np.random.Generator, feature_px: float = 6.0) -> np.ndarray:
    """Thickness map of an integrated-circuit-like Manhattan layout.

    Three metal layers of decreasing thickness (1.0, 0.6, 0.35) with alternating wire directions on a track
    pitch of ~2–4 `feature_px`, wire widths of 1–2 features, and vias (small squares) on the wires.
    """
    h, w = shape
    t = np.zeros(shape)
    layers = ((1.0, 0, 2.0), (0.6, 1, 3.0), (0.35, 0, 4.0))  # (thickness, axis 0 = horizontal wires, pitch)
    for thick, axis, pitch_f in layers:
        layer = np.zeros(shape)
        pitch = max(2, int(round(pitch_f * feature_px)))
        long_len, across = (w, h) if axis == 0 else (h, w)
        for track in range(int(rng.integers(0, pitch)), across, pitch):
            width = max(1, int(round(feature_px * rng.choice([1.0, 1.0, 1.5, 2.0]))))
            pos = int(rng.integers(0, max(1, long_len // 4)))
            while pos < long_len:  # segments with gaps along the track
                seg = int(rng.integers(4, 40) * feature_px)
                if rng.random() < 0.75:
                    a, b = pos, min(long_len, pos + seg)
                    if axis == 0:
                        layer[track : track + width, a:b] = 1.0
                    else:
                        layer[a:b, track : track + width] = 1.0
                pos += seg + int(rng.integers(2, 12) * feature_px)
        t += thick * layer
    n_vias = int(h * w / (12 * feature_px) ** 2)
    wires = t > 0
    vs = max(1, int(round(feature_px)))
    for vy, vx in zip(rng.integers(0, h, n_vias), rng.integers(0, w, n_vias), strict=True):
        if wires[vy, vx]:
            t[vy : vy + vs, vx : vx + vs] += 0.5
    # fabrication/imaging blur of ~half a pixel antialiases the rectilinear edges
    return gaussian_filter(t / 2.45, 0.6)


def cells(shape: tuple[int, int], rng: np.random.Generator, cell_px: float = 40.0,
          coverage: float = 0.6) -> np.ndarray:
    """Thickness map of cell-like soft matter: ellipses with a dense membrane, a nucleus and vesicles."""
    h, w = shape
    t = 0.05 * _normalise(_power_law_noise(shape, rng, 3.0))  # a faint uneven substrate
    n_cells = max(1, int(coverage * h * w / (np.pi * (cell_px / 2) ** 2)))
    for _ in range(n_cells):
        a = cell_px / 2 * rng.uniform(0.6, 1.4)
        b = a * rng.uniform(0.6, 1.0)
        cy, cx, ang = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0, np.pi)
        r0, r1 = int(max(0, cy - a - 3)), int(min(h, cy + a + 4))
        c0, c1 = int(max(0, cx - a - 3)), int(min(w, cx + a + 4))
        if r1 <= r0 or c1 <= c0:
            continue
        yy, xx = np.mgrid[r0:r1, c0:c1].astype(np.float64)
        u = (xx - cx) * np.cos(ang) + (yy - cy) * np.sin(ang)
        v = -(xx - cx) * np.sin(ang) + (yy - cy) * np.cos(ang)
        rho = np.hypot(u / a, v / b)
        edge = (1.0 - rho) * b  # ≈ distance inside the boundary, px
        body = 0.3 * np.clip(edge + 0.5, 0, 1)
        membrane = np.clip(1.5 - np.abs(edge - 1.0), 0, 1)  # ~2-px dense envelope
        nucleus = 0.35 * np.clip((0.45 - np.hypot((u - 0.2 * a) / a, v / b)) * b + 0.5, 0, 1)
        cell = body + nucleus + 0.7 * membrane
        for _ in range(int(rng.integers(2, 7))):  # vesicles / organelles
            vu, vv, vr = rng.uniform(-0.6, 0.6) * a, rng.uniform(-0.6, 0.6) * b, rng.uniform(1.5, 0.12 * a + 2)
            cell += 0.3 * np.clip(vr + 0.5 - np.hypot(u - vu, v - vv), 0, 1) * (rho < 0.9)
        t[r0:r1, c0:c1] = np.maximum(t[r0:r1, c0:c1], cell)
    return gaussian_filter(np.clip(t, 0, 1.4) / 1.4, 0.7)


def _power_law_noise(shape: tuple[int, int], rng: np.random.Generator, alpha: float) -> np.ndarray:
    """Gaussian random field with power spectrum ∝ 1/f^alpha."""
    fy = sfft.fftfreq(shape[0])[:, None]
    fx = sfft.rfftfreq(shape[1])[None, :]
    f = np.hypot(fy, fx)
    f[0, 0] = 1.0
    amp = f ** (-alpha / 2.0)
    amp[0, 0] = 0.0
    spec = (rng.standard_normal(amp.shape) + 1j * rng.standard_normal(amp.shape)) * amp
    return sfft.irfft2(spec, s=shape)


def texture(shape: tuple[int, int], rng: np.random.Generator, alpha: float = 3.0,
            edge_weight: float = 0.4) -> np.ndarray:
    """Natural-image-like thickness map: smooth 1/f^alpha clutter plus regions with sharp (1-px) boundaries."""
    smooth = _normalise(_power_law_noise(shape, rng, alpha))
    regions = _power_law_noise(shape, rng, 3.5)
    levels = np.quantile(regions, rng.uniform(0.2, 0.8, 2))
    piecewise = (regions > levels.min()).astype(float) * 0.5 + (regions > levels.max()) * 0.5
    return (1 - edge_weight) * smooth + edge_weight * gaussian_filter(piecewise, 0.6)


def make_object(kind: str, shape: tuple[int, int] | int, seed: int = 0, phase_range: float | None = None,
                amplitude_min: float | None = None, **kw) -> np.ndarray:
    """Complex64 (H, W) object of `kind`, amplitude in [amplitude_min, 1] ⊂ (0, 1], phase spanning phase_range.

    Deterministic from `seed`. Extra keywords go to the kind's generator (e.g. n_spokes, feature_px, cell_px,
    alpha). Siemens star, IC and cells couple amplitude and phase through one thickness map (one material);
    texture draws them independently, as the PtychoNN-style natural-image training sets do.
    """
    if kind not in OBJECT_KINDS:
        raise ValueError(f"unknown object kind {kind!r}; choose one of {', '.join(OBJECT_KINDS)}")
    shape = (shape, shape) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"object shape must be two positive ints, got {shape}")
    pr_default, am_default = _DEFAULTS[kind]
    phase_range = pr_default if phase_range is None else float(phase_range)
    amplitude_min = am_default if amplitude_min is None else float(amplitude_min)
    if phase_range < 0:
        raise ValueError(f"phase_range must be >= 0 rad, got {phase_range}")
    if not 0.0 < amplitude_min <= 1.0:
        raise ValueError(f"amplitude_min must be in (0, 1], got {amplitude_min}")
    generator = {"siemens-star": siemens_star, "ic": ic_layout, "cells": cells, "texture": texture}[kind]
    allowed = [n for n in inspect.signature(generator).parameters if n not in ("shape", "rng")]
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for object kind {kind!r}; allowed: {', '.join(allowed)}")
    rng = np.random.default_rng(seed)
    if kind == "siemens-star":
        t = siemens_star(shape, rng, **kw)
        return _to_complex(t, t, phase_range, amplitude_min)
    if kind == "ic":
        t = ic_layout(shape, rng, **kw)
        return _to_complex(t, t, phase_range, amplitude_min)
    if kind == "cells":
        t = cells(shape, rng, **kw)
        return _to_complex(t, t, phase_range, amplitude_min)
    return _to_complex(texture(shape, rng, **kw), texture(shape, rng, **kw), phase_range, amplitude_min)
