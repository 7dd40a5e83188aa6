"""The HAL contract: tensor specs, device-visible allocators and the Backend interface every device implements."""

from __future__ import annotations

import abc
import mmap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np


class BackendUnavailable(RuntimeError):
    """The backend's SDK or device is missing; `reason` says what, `fix` says how to get it."""

    def __init__(self, backend: str, reason: str, fix: str = ""):
        self.backend, self.reason, self.fix = backend, reason, fix
        super().__init__(f"backend '{backend}' unavailable: {reason}" + (f" — fix: {fix}" if fix else ""))


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as the device sees it. Real value = stored value × scale."""

    name: str
    shape: tuple[int, ...]  # batch first, NCHW
    dtype: np.dtype
    layout: str = "NCHW"
    scale: float = 1.0
    fix_point: int | None = None  # DPU int8: scale = 2**-fix_point

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


class Allocator(abc.ABC):
    """Memory the device reads without a copy; the ring and the batcher allocate from it once."""

    name: ClassVar[str] = "abstract"
    zero_copy: ClassVar[bool] = False  # True when the device reads these pages directly

    @abc.abstractmethod
    def empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """A host view of a new device-visible buffer; lives until close()."""

    def device_pointer(self, array: np.ndarray) -> int | None:
        """The address the device uses for `array` (None when the device takes host arrays)."""
        return None

    def close(self) -> None:
        """Release every buffer this allocator handed out."""


class HostAllocator(Allocator):
    """Page-aligned anonymous memory: what a CPU backend (and DMA engines wanting alignment) read directly."""

    name = "host"
    zero_copy = True

    def __init__(self) -> None:
        self._maps: list[mmap.mmap] = []

    def empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = max(int(np.prod(shape)) * dtype.itemsize, 1)
        buf = mmap.mmap(-1, nbytes)  # anonymous maps are page aligned
        self._maps.append(buf)
        return np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape))).reshape(shape)

    def close(self) -> None:
        # Views may outlive us in user code; mmap.close() would then raise BufferError. Drop refs only.
        self._maps.clear()


@dataclass
class Ticket:
    """Handle for one submitted batch; `n` frames of it are valid."""

    index: int
    n: int
    outputs: dict[str, np.ndarray]
    handle: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


class Backend(abc.ABC):
    """One device family running the CNN. Open through `edgeptycho.hw.open_backend(name, model, batch)`."""

    name: ClassVar[str] = "abstract"
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)

    def __init__(self, model_path: str | Path, batch_size: int, precision: str = "fp32", **options: Any):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if precision not in self.precisions:
            raise ValueError(f"backend '{self.name}' supports precisions {self.precisions}, not '{precision}'")
        self.model_path = Path(model_path)
        self.batch_size = int(batch_size)
        self.precision = precision
        self.options = options

    # --- discovery -------------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def probe(cls) -> None:
        """Raise BackendUnavailable (reason + fix) if the SDK or device is missing; cheap, no model needed."""

    # --- the contract ----------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def input_spec(self) -> TensorSpec: ...

    @property
    @abc.abstractmethod
    def output_spec(self) -> tuple[TensorSpec, ...]: ...

    def allocator(self) -> Allocator:
        """The memory this device reads without a copy."""
        return HostAllocator()

    @abc.abstractmethod
    def submit(self, inputs: np.ndarray, outputs: dict[str, np.ndarray], n: int | None = None) -> Ticket:
        """Start inference on the first `n` frames (default: all) of `inputs` into preallocated `outputs`."""

    @abc.abstractmethod
    def wait(self, ticket: Ticket) -> dict[str, np.ndarray]:
        """Block until `ticket` is done; returns its outputs (the arrays given to submit)."""

    def telemetry(self) -> dict[str, Any]:
        """Power (W), temperature (C), clocks where a sensor exists, else an explicit reason."""
        return {"power_w": None, "unavailable": f"{self.name}: no power sensor"}

    def close(self) -> None:
        """Release device resources."""

    # --- conveniences ----------------------------------------------------------------------------
    def new_outputs(self, allocator: Allocator | None = None) -> dict[str, np.ndarray]:
        """Preallocate one batch of outputs."""
        alloc = allocator or HostAllocator()
        return {s.name: alloc.empty(s.shape, s.dtype) for s in self.output_spec}

    def infer(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Synchronous inference of any number of frames (chunks of batch_size); for tools and tests."""
        spec = self.input_spec
        x = np.asarray(x)
        if x.ndim == len(spec.shape) - 1:
            x = x[None]
        if tuple(x.shape[1:]) != tuple(spec.shape[1:]):
            raise ValueError(f"{self.name}: input shape {x.shape[1:]} does not match model {spec.shape[1:]}")
        results: dict[str, list[np.ndarray]] = {s.name: [] for s in self.output_spec}
        batch = np.zeros(spec.shape, dtype=spec.dtype)
        outputs = self.new_outputs()
        for start in range(0, len(x), self.batch_size):
            chunk = x[start:start + self.batch_size]
            batch[: len(chunk)] = chunk
            out = self.wait(self.submit(batch, outputs, n=len(chunk)))
            for name, arr in out.items():
                results[name].append(arr[: len(chunk)].copy())
        return {k: np.concatenate(v) if v else np.empty((0,)) for k, v in results.items()}

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
