"""Array-module selection for the iterative solvers: numpy + scipy.fft on the CPU, CuPy or PyTorch on a GPU.

The solver is written once against an `ArrayBackend`: arithmetic operators and the `xp.multiply/abs/sqrt/
divide/exp(…, out=…)` functions that numpy, CuPy and PyTorch share are used directly; the few operations whose
spelling differs (FFTs, allocation, strided window views, scatter-add, host transfer) are methods here.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.fft as sfft

from . import fourier

BACKEND_NAMES = ("auto", "numpy", "cupy", "torch")


@dataclass
class ArrayBackend:
    """One array library on one device, plus the handful of operations whose spelling differs between them."""

    name: str          # "numpy" | "cupy" | "torch"
    xp: Any            # the array module
    device: str = "cpu"
    workers: int = -1  # scipy.fft threads (numpy only); -1 = all cores

    # -- dtypes and transfers -------------------------------------------------------------------------
    @property
    def c64(self) -> Any:
        return self.xp.complex64

    @property
    def f32(self) -> Any:
        return self.xp.float32

    def asarray(self, a: Any, dtype: Any = None) -> Any:
        """Host (numpy) or device array → this backend's array, on its device, optionally cast."""
        if self.name == "torch":
            t = a if isinstance(a, self.xp.Tensor) else self.xp.from_numpy(np.ascontiguousarray(a))
            return t.to(device=self.device, dtype=dtype) if dtype is not None else t.to(self.device)
        return self.xp.asarray(a, dtype=dtype)

    def to_numpy(self, a: Any) -> np.ndarray:
        if self.name == "torch":
            return a.detach().cpu().numpy()
        if self.name == "cupy":
            return self.xp.asnumpy(a)
        return np.asarray(a)

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Any:
        if self.name == "torch":
            return self.xp.zeros(shape, dtype=dtype, device=self.device)
        return self.xp.zeros(shape, dtype=dtype)

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Any:
        if self.name == "torch":
            return self.xp.empty(shape, dtype=dtype, device=self.device)
        return self.xp.empty(shape, dtype=dtype)

    def index(self, a: np.ndarray) -> Any:
        """Host integer indices → device index array."""
        if self.name == "torch":
            return self.xp.from_numpy(np.asarray(a, np.int64)).to(self.device)
        return self.xp.asarray(a)

    def copy(self, a: Any) -> Any:
        return a.clone() if self.name == "torch" else a.copy()

    def scalar(self, a: Any) -> float:
        """A 0-d device array (a reduction) → Python float (synchronises on a GPU)."""
        return float(a.item()) if self.name == "torch" else float(a)

    def sumsq(self, a: Any) -> float:
        """Σ a² of a real array, in one pass (BLAS dot on the CPU)."""
        if self.name == "numpy":
            return float(np.vdot(a, a))
        return self.scalar((a * a).sum())

    def synchronize(self) -> None:
        """Wait for queued device work (for honest timings); a no-op on the CPU."""
        if self.name == "cupy":
            self.xp.cuda.Stream.null.synchronize()
        elif self.name == "torch" and self.device != "cpu":
            self.xp.cuda.synchronize()

    # -- transforms ----------------------------------------------------------------------------------
    # The solver keeps measured amplitudes in FFT order (ifftshifted once), so it needs only the unshifted
    # ortho pair: fft2c(x) == ifftshift(fourier.far_field(x)) and ifft2c is its exact inverse. Same sign,
    # same normalisation as physics.fourier; two fewer copies per batch.
    def fft2c(self, x: Any) -> Any:
        """Orthonormal 2-D FFT over the last two axes, zero frequency at index 0; may overwrite `x`."""
        if self.name == "numpy":
            return sfft.fft2(x, norm="ortho", workers=self.workers, overwrite_x=True)
        return self.xp.fft.fft2(x, norm="ortho")

    def ifft2c(self, x: Any) -> Any:
        """Exact inverse of fft2c; may overwrite `x`."""
        if self.name == "numpy":
            return sfft.ifft2(x, norm="ortho", workers=self.workers, overwrite_x=True)
        return self.xp.fft.ifft2(x, norm="ortho")

    def far_field(self, x: Any) -> Any:
        """physics.fourier.far_field on this backend (zero frequency at the centre)."""
        if self.name == "numpy":
            return fourier.far_field(x)
        return self.fftshift(self.xp.fft.fft2(x, norm="ortho"))

    def fftshift(self, x: Any) -> Any:
        if self.name == "torch":
            return self.xp.fft.fftshift(x, dim=(-2, -1))
        return self.xp.fft.fftshift(x, axes=(-2, -1))

    def ifftshift(self, x: Any) -> Any:
        if self.name == "torch":
            return self.xp.fft.ifftshift(x, dim=(-2, -1))
        return self.xp.fft.ifftshift(x, axes=(-2, -1))

    def shift_ramps(self, frac: np.ndarray, n: int) -> Any:
        """(B, n, n) complex64 Fourier ramps that translate an (n, n) array by frac (B, 2) (row, col) pixels.

        ifft2(fft2(x) · ramp_j) == fourier.fourier_shift(x, frac_j): one probe spectrum is shifted to every
        position of a batch with one inverse FFT each (the ramps are built on the host by fourier.shift_ramp).
        """
        return self.asarray(fourier.shift_ramp((n, n), frac, np.complex64))

    # -- strided views and scatter -----------------------------------------------------------------------
    def windows(self, a: Any, n: int) -> Any:
        """Read-only (H−n+1, W−n+1, n, n) view of all n×n windows of a 2-D array (indexing it gathers)."""
        if self.name == "torch":
            return a.unfold(0, n, 1).unfold(1, n, 1)
        if self.name == "cupy":
            from cupy.lib.stride_tricks import sliding_window_view
            return sliding_window_view(a, (n, n))
        return np.lib.stride_tricks.sliding_window_view(a, (n, n))

    def scatter_add(self, acc: Any, values: Any, starts: np.ndarray, method: str = "auto") -> None:
        """acc[r:r+n, c:c+n] += values[j] for every (r, c) = starts[j]; windows may overlap.

        method "loop": contiguous slice-adds, one per window; "add_at": one unbuffered scatter on flat indices
        (np.add.at, torch index_add_, cupyx.scatter_add). "auto": loop on numpy (measured faster there by
        benchmarks/bench_epie.py --scatter, as it needs no index array), add_at on the others, where it is one
        kernel instead of B launches.
        """
        n = values.shape[-1]
        if method == "auto":
            method = "loop" if self.name == "numpy" else "add_at"
        if method == "loop":
            for j, (r, c) in enumerate(starts.tolist()):
                acc[r:r + n, c:c + n] += values[j]
            return
        if method != "add_at":
            raise ValueError(f"unknown scatter method {method!r}; choose auto, loop or add_at")
        flat = self.index(flat_window_indices(starts, n, acc.shape[1]).ravel())
        vals = values.reshape(-1)
        if self.name == "torch":
            acc.view(-1).index_add_(0, flat, vals)
        elif self.name == "cupy":
            import cupyx
            cupyx.scatter_add(acc.reshape(-1), flat, vals)
        else:
            np.add.at(acc.reshape(-1), flat, vals)


def flat_window_indices(starts: np.ndarray, n: int, width: int) -> np.ndarray:
    """(B, n, n) flat indices into a row-major (·, width) array of the n×n windows at top-left corners starts."""
    off = (np.arange(n)[:, None] * width + np.arange(n)[None, :]).astype(np.int64)
    base = starts[:, 0].astype(np.int64) * width + starts[:, 1]
    return base[:, None, None] + off[None]


def available() -> dict[str, str]:
    """Backend name → "" when usable here, else why not."""
    out = {"numpy": ""}
    out["cupy"] = "" if _cupy_gpu() else "cupy not installed or no CUDA device"
    if importlib.util.find_spec("torch") is None:
        out["torch"] = "torch not installed"
    else:
        out["torch"] = ""
    return out


def _cupy_gpu() -> bool:
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # driver missing or broken: treat as no GPU
        return False


def _torch_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch
    return bool(torch.cuda.is_available())


def get_backend(name: str = "auto", device: str | None = None, workers: int = -1) -> ArrayBackend:
    """The array backend by name. "auto": CuPy if a CUDA GPU is visible, else PyTorch on CUDA, else numpy.

    "torch" without a device picks CUDA when available, else the CPU (useful to check the GPU code path on
    a CPU-only machine). Asking for a library that is missing names it and how to get it.
    """
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown array backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if name == "auto":
        if _cupy_gpu():
            name = "cupy"
        elif _torch_cuda():
            name, device = "torch", device or "cuda"
        else:
            name = "numpy"
    if name == "numpy":
        return ArrayBackend("numpy", np, "cpu", workers)
    if name == "cupy":
        if not _cupy_gpu():
            raise RuntimeError("array backend 'cupy' needs CuPy and a CUDA GPU: pip install cupy-cuda12x")
        import cupy
        return ArrayBackend("cupy", cupy, f"cuda:{cupy.cuda.Device().id}", workers)
    if importlib.util.find_spec("torch") is None:
        raise RuntimeError("array backend 'torch' needs PyTorch: pip install torch==2.13.0")
    import torch
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return ArrayBackend("torch", torch, dev, workers)
