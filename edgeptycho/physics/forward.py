"""The forward model: object patches at sub-pixel positions, far-field intensities of mixed-state probes, noise."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import numpy as np
import scipy.fft as sfft
from numpy.lib.stride_tricks import sliding_window_view

from .fourier import fourier_shift, shift_ramp

_WORKERS = -1

Progress = Callable[[int, int], None]


def _as_modes(probe_modes: np.ndarray) -> np.ndarray:
    p = np.asarray(probe_modes)
    if p.ndim == 2:
        p = p[None]
    if p.ndim != 3 or p.shape[-1] != p.shape[-2]:
        raise ValueError(f"probe must be (n, n) or (K, n, n) square, got {p.shape}")
    return p


def window_starts(positions_px: np.ndarray, n: int, obj_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Integer top-left corners (N, 2) and fractional remainders in [0, 1) of windows centred on positions.

    A position p is the centre of the window (window index n//2): the window starts at floor(p) − n//2 and the
    remainder p − floor(p) is applied as a sub-pixel shift.
    """
    pos = np.asarray(positions_px, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2:
        raise ValueError(f"positions must be (N, 2) (row, col) in pixels, got shape {pos.shape}")
    if not np.isfinite(pos).all():
        raise ValueError("positions contain NaN or inf")
    base = np.floor(pos)
    starts = base.astype(np.int64) - n // 2
    bad = (starts < 0).any(axis=1) | (starts[:, 0] + n > obj_shape[0]) | (starts[:, 1] + n > obj_shape[1])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{int(bad.sum())} scan windows of {n}x{n} px fall outside the {obj_shape[0]}x{obj_shape[1]} object "
            f"(first: position {i} at {pos[i].tolist()} px); enlarge the object or move the scan"
        )
    return starts, pos - base


def _integer_patches(obj: np.ndarray, starts: np.ndarray, n: int) -> np.ndarray:
    """(B, n, n) copies of the windows at integer corners, by one fancy-index into a strided window view."""
    return sliding_window_view(obj, (n, n))[starts[:, 0], starts[:, 1]]


def extract_patches(obj: np.ndarray, positions_px: np.ndarray, n: int, subpixel: bool = True) -> np.ndarray:
    """(N, n, n) complex64 object patches O(i + p − n//2, j + …) centred on sub-pixel positions p.

    The integer part is sliced, the fractional part applied by a Fourier shift of the patch (taken 4 px
    larger, edge-padded, so the periodic wrap of the shift never reaches the returned pixels).
    subpixel=False rounds down instead (exactly the integer placement the forward model multiplies the
    shifted probe with).
    """
    obj = np.asarray(obj)
    starts, frac = window_starts(positions_px, n, obj.shape)
    obj = obj.astype(np.complex64, copy=False)
    if not subpixel or not frac.any():
        return _integer_patches(obj, starts, n)
    m = 4
    padded = np.pad(obj, m, mode="edge")
    big = _integer_patches(padded, starts, n + 2 * m)
    return fourier_shift(big, -frac)[:, m : m + n, m : m + n].astype(np.complex64, copy=False)


def diffraction_intensity(obj: np.ndarray, probe_modes: np.ndarray, positions_px: np.ndarray,
                          batch_size: int = 32, progress: Progress | None = None,
                          frame_size: int | None = None) -> np.ndarray:
    """(N, n, n) float32 far-field intensities Σ_k |F(P_k(r − f) · O_int)|², zero frequency at the centre.

    O_int is the window at the integer part of each position and f the fractional part: shifting the probe
    instead of the object gives the same intensity (a translation of the whole exit wave is only a phase
    ramp in the far field). Incoherent probe modes add in intensity. Work is done in complex64 batches of
    `batch_size` positions with multi-threaded scipy FFTs; `progress(done, total)` is called per batch.
    `frame_size`, when given, is the detector frame the probe must fit into.
    """
    probe = _as_modes(probe_modes).astype(np.complex64, copy=False)
    n = probe.shape[-1]
    if frame_size is not None and n > frame_size:
        raise ValueError(f"probe array {n}x{n} is larger than the detector frame {frame_size}x{frame_size}")
    obj = np.asarray(obj)
    if obj.ndim != 2:
        raise ValueError(f"object must be 2-D (H, W), got shape {obj.shape}")
    if obj.shape[0] < n or obj.shape[1] < n:
        raise ValueError(f"object {obj.shape} is smaller than the {n}x{n} probe window")
    starts, frac = window_starts(positions_px, n, obj.shape)
    obj = obj.astype(np.complex64, copy=False)
    total = len(starts)
    out = np.empty((total, n, n), np.float32)
    # the probe's spectrum is transformed once; each batch only multiplies it by the translation ramp
    # (fourier.shift_ramp, the core of fourier_shift) and inverts it: one FFT per mode and position saved
    spec = sfft.fft2(probe, workers=_WORKERS)
    for b0 in range(0, total, batch_size):
        sl = slice(b0, min(total, b0 + batch_size))
        patches = _integer_patches(obj, starts[sl], n)  # (B, n, n)
        f = frac[sl]
        ramp = shift_ramp((n, n), f, np.complex64) if f.any() else None
        acc = out[sl]
        acc[...] = 0.0
        for k in range(probe.shape[0]):
            if ramp is None:
                wave = probe[k] * patches
            else:
                wave = sfft.ifft2(spec[k] * ramp, workers=_WORKERS, overwrite_x=True)
                wave *= patches
            # |far_field(ψ)|² with the fftshift applied once to the summed float32 intensity below
            wave = sfft.fft2(wave, norm="ortho", workers=_WORKERS, overwrite_x=True)
            acc += np.square(wave.real)
            acc += np.square(wave.imag)
        acc[...] = sfft.fftshift(acc, axes=(-2, -1))
        if progress is not None:
            progress(sl.stop, total)
    return out


def add_noise(intensity: np.ndarray, dose: float | None = None, background: float = 0.0,
              saturation: float | None = None, rng: np.random.Generator | int | None = None) -> np.ndarray:
    """Detector counts from expected intensities (N, H, W).

    dose: mean photons per pattern reaching the detector. The intensities are scaled so that their mean
    pattern sum equals `dose` (pattern-to-pattern variations, e.g. from absorption, are kept), then a flat
    `background` (mean photons per pixel, e.g. air scatter / dark signal) is added and every pixel is drawn
    from a Poisson law; counts above `saturation` are clipped to it. Returns uint32 counts.
    dose=None: noise-free; returns float32 intensity + background, clipped at `saturation` if given.
    """
    inten = np.asarray(intensity)
    if dose is not None and not (np.isfinite(dose) and dose > 0):
        raise ValueError(f"dose must be a positive number of photons per pattern (or None), got {dose}")
    if not np.isfinite(background) or background < 0:
        raise ValueError(f"background must be >= 0 photons per pixel, got {background}")
    if saturation is not None and not saturation > 0:
        raise ValueError(f"saturation must be a positive count, got {saturation}")
    if (inten < 0).any():
        raise ValueError("intensities must be non-negative")
    if dose is None:
        out = inten.astype(np.float32) + np.float32(background)
        return np.minimum(out, np.float32(saturation)) if saturation is not None else out
    frame_sum = inten.reshape(-1, *inten.shape[-2:]).sum(axis=(-2, -1), dtype=np.float64).mean()
    if frame_sum <= 0:
        raise ValueError("intensities are all zero: cannot scale them to a dose")
    scale = dose / frame_sum
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    flat = inten.reshape(-1, *inten.shape[-2:])
    out = np.empty(flat.shape, np.uint32)
    cap = np.iinfo(np.uint32).max if saturation is None else min(float(saturation), np.iinfo(np.uint32).max)
    chunk = 32  # bounded float64 temporaries instead of a copy of the whole stack
    for i in range(0, len(flat), chunk):
        lam = flat[i : i + chunk].astype(np.float64) * scale
        if background:
            lam += background
        out[i : i + chunk] = np.minimum(rng.poisson(lam), cap)
    return out.reshape(inten.shape)


def crop_center(frames: np.ndarray, n: int) -> np.ndarray:
    """Central n×n of frames (..., H, W), keeping the zero frequency (index H//2) at index n//2."""
    h, w = frames.shape[-2:]
    if n < 1 or n > min(h, w):
        raise ValueError(f"crop size {n} must be in [1, {min(h, w)}] for frames {h}x{w}")
    r0, c0 = h // 2 - n // 2, w // 2 - n // 2
    return frames[..., r0 : r0 + n, c0 : c0 + n]


# Per-thread buffers for bin_frames' intermediates: the serve loop bins a few frames at a time, and fresh
# temporaries of a few hundred KiB each call cost page faults and cache misses (a 4-frame call of 256² uint32
# frames not in cache: 159 µs/frame with temporaries, 31 µs with reused buffers). Larger calls allocate.
_SCRATCH_MAX_BYTES = 8 << 20
_scratch = threading.local()


def _scratch_array(name: str, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """A reusable per-thread array of `shape` for intermediates (never returned to callers)."""
    dt = np.dtype(dtype)
    size = math.prod(shape)
    if size * dt.itemsize > _SCRATCH_MAX_BYTES:
        return np.empty(shape, dt)
    bufs = _scratch.__dict__.setdefault("bufs", {})
    buf = bufs.get((name, dt))
    if buf is None or buf.size < size:
        buf = bufs[(name, dt)] = np.empty(size, dt)
    return buf[:size].reshape(shape)


def binning_ramp(size: int, grid: int, b: int) -> np.ndarray:
    """(size, size) complex64 exit-wave factor for comparing a grid×grid FFT with b×b-binned frames.

    A binned pixel integrates detector pixels [b·k, b·k + b − 1], so its centre lies (b − 1)/2 detector
    pixels, (b − 1)/(2b) of a sample, from the FFT sample it is compared with (DC sits on detector pixel n/2,
    fourier.far_field). Multiplying the exit wave (probe window of `size` px on the `grid`-point FFT) by this
    ramp moves the far field by that much. Without it the model of a perfect object misfits binned data: the
    quality residual's floor doubled, and a region solved against 2×-binned frames took the ramp into the
    object and left seams where it was pasted back.
    """
    d = (b - 1) / (2.0 * b)
    r = np.exp(-2j * np.pi * d * np.arange(size) / grid)
    return (r[:, None] * r[None, :]).astype(np.complex64)


def bin_frames(frames: np.ndarray, b: int, dtype: np.dtype | type | None = None,
               out: np.ndarray | None = None) -> np.ndarray:
    """Sum b×b pixel blocks of frames (..., H, W); H and W must be multiples of b. Counts are conserved.

    `dtype` sets the result (and accumulator) type, e.g. float32 for model input without an extra pass;
    `out` (with `dtype`), a preallocated (..., H/b, W/b) array of that type to write the result into.
    """
    h, w = frames.shape[-2:]
    if b < 1 or h % b or w % b:
        raise ValueError(f"bin factor {b} must be >= 1 and divide the frame size {h}x{w}")
    if out is not None and (dtype is None or out.dtype != np.dtype(dtype)
                            or out.shape != (*frames.shape[:-2], h // b, w // b)):
        raise ValueError(f"out must be {(*frames.shape[:-2], h // b, w // b)} of dtype {dtype}, "
                         f"got {out.shape} {out.dtype}")
    if b == 1:
        if out is None:
            return frames if dtype is None else frames.astype(dtype, copy=False)
        np.copyto(out, frames, casting="unsafe")
        return out
    if dtype is not None:
        # Cast once into a reused buffer, then strided same-type sums with out=: rows first (a row slice is
        # contiguous, so the full-size pass runs on unit stride), then columns on the half-size result.
        # Mixed-type adds are 3x slower and a multi-axis reduce with a cast ~10x.
        full = frames
        if frames.dtype != np.dtype(dtype):
            full = _scratch_array("full", frames.shape, dtype)
            np.copyto(full, frames, casting="unsafe")
        rows = _scratch_array("rows", (*frames.shape[:-2], h // b, w), dtype)
        np.add(full[..., 0::b, :], full[..., 1::b, :], out=rows)
        for i in range(2, b):
            rows += full[..., i::b, :]
        if out is None:
            out = np.empty((*frames.shape[:-2], h // b, w // b), dtype)
        np.add(rows[..., 0::b], rows[..., 1::b], out=out)
        for j in range(2, b):
            out += rows[..., j::b]
        return out
    acc = np.uint64 if np.issubdtype(frames.dtype, np.integer) else None
    out = frames.reshape(*frames.shape[:-2], h // b, b, w // b, b).sum(axis=(-3, -1), dtype=acc)
    return out.astype(frames.dtype, copy=False) if acc is None else out.astype(frames.dtype)
