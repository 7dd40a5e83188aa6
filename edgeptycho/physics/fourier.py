"""The FFT conventions of the whole project: centred, orthonormal far-field transforms and sub-pixel shifts."""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft

# DESIGN.md: I = |FFTSHIFT(FFT2(P·O, norm="ortho"))|². The exit wave is not ifftshifted first: that only
# multiplies the far field by a ±1 checkerboard, invisible in intensity, and keeps the pair exact inverses.

_WORKERS = -1


def far_field(exit_wave: np.ndarray) -> np.ndarray:
    """Exit wave(s) (..., N, N) → far-field amplitude, zero frequency at the centre, energy preserved."""
    return sfft.fftshift(sfft.fft2(exit_wave, norm="ortho", workers=_WORKERS), axes=(-2, -1))


def back_propagate(field: np.ndarray) -> np.ndarray:
    """Exact inverse of far_field."""
    return sfft.ifft2(sfft.ifftshift(field, axes=(-2, -1)), norm="ortho", workers=_WORKERS)


def shift_ramp(shape: tuple[int, int], shift: np.ndarray | tuple[float, float], dtype=np.complex128) -> np.ndarray:
    """Translation-theorem phase ramp (H, W), or (n, H, W) for shifts (n, 2), in unshifted FFT order.

    Built separably, exp(−2πi·fy·dy) ⊗ exp(−2πi·fx·dx): H + W complex exponentials per shift instead of H·W.
    Multiplying a spectrum (fft2 of x) by it and inverting shifts x by (drow, dcol).
    """
    h, w = shape
    fy = sfft.fftfreq(h)
    fx = sfft.fftfreq(w)
    s = np.asarray(shift, dtype=np.float64)
    ry = np.exp(-2j * np.pi * fy * s[..., 0, None]).astype(dtype)
    rx = np.exp(-2j * np.pi * fx * s[..., 1, None]).astype(dtype)
    return ry[..., :, None] * rx[..., None, :]


def fourier_shift(x: np.ndarray, shift: np.ndarray | tuple[float, float]) -> np.ndarray:
    """Shift the last two axes of `x` by (drow, dcol) pixels (sub-pixel, periodic), by the translation theorem.

    `shift` may be (2,) for all of `x` or (n, 2) for a stack (n, H, W).
    """
    ctype = np.complex64 if x.dtype in (np.float32, np.complex64) else np.complex128
    ramp = shift_ramp(x.shape[-2:], shift, ctype)
    out = sfft.ifft2(sfft.fft2(x.astype(ctype, copy=False), workers=_WORKERS) * ramp, workers=_WORKERS)
    return out if np.iscomplexobj(x) else out.real


def object_pixel_size(wavelength_m: float, distance_m: float, n_pixels: int, detector_pixel_m: float) -> float:
    """Object pixel size λ·z / (N·Δ_det) in metres."""
    return wavelength_m * distance_m / (n_pixels * detector_pixel_m)


H_C = 6.62607015e-34 * 299792458.0  # J·m


def wavelength_from_energy(energy_J: float) -> float:
    """Photon wavelength (m) from photon energy (J)."""
    if energy_J <= 0:
        raise ValueError(f"photon energy must be positive, got {energy_J} J")
    return H_C / energy_J


EV = 1.602176634e-19  # J per eV
