"""The HAL contract: tensor specs, device-visible allocators and the Backend interface every device implements."""

from __future__ import annotations

import abc
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np


def cache_dir(*parts: str) -> Path:
    """Where backends keep derived artifacts (TensorRT engines, QDQ models): $EDGEPTYCHO_CACHE or ~/.cache/edgeptycho."""
    root = Path(os.environ.get("EDGEPTYCHO_CACHE") or Path.home() / ".cache" / "edgeptycho")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


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

    def close(self) -> None:  # noqa: B027 - optional hook, deliberately a no-op
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


class InFlight:
    """Batches in flight on a fixed ring of slots (double buffering): reusing a slot first finishes its batch.

    `finish(ticket)` blocks until the device is done with the ticket and its outputs are in place.
    """

    def __init__(self, slots: int, finish: Callable[[Ticket], None]):
        self.pending: list[Ticket | None] = [None] * slots
        self._finish = finish
        self.count = 0

    def next_slot(self) -> int:
        slot = self.count % len(self.pending)
        if self.pending[slot] is not None:
            self.complete(self.pending[slot])  # its buffers are about to be reused
        return slot

    def issue(self, slot: int, n: int, outputs: dict[str, np.ndarray], handle: Any = None, **extra: Any) -> Ticket:
        ticket = Ticket(self.count, n, outputs, handle, {"slot": slot, "done": False, **extra})
        self.pending[slot] = ticket
        self.count += 1
        return ticket

    def complete(self, ticket: Ticket) -> dict[str, np.ndarray]:
        if not ticket.extra["done"]:
            try:
                self._finish(ticket)
            finally:  # a failed batch raises once, here; its slot is free for the next one
                ticket.extra["done"] = True
                if self.pending[ticket.extra["slot"]] is ticket:
                    self.pending[ticket.extra["slot"]] = None
        return ticket.outputs

    def drain(self) -> None:
        for ticket in self.pending:
            if ticket is not None:
                self.complete(ticket)


class Backend(abc.ABC):
    """One device family running the CNN. Open through `edgeptycho.hw.open_backend(name, model, batch)`."""

    name: ClassVar[str] = "abstract"
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)
    profile: ClassVar[str | None] = None  # hw/profiles/<profile>.yaml describing the target device
    # True where wait() may run on another thread than submit(), concurrently with the next submit(): the
    # pipeline then waits on a thread of its own and keeps every in-flight slot busy. Off unless proven safe
    # for the SDK (VART wants one thread per runner).
    wait_from_other_thread: bool = False

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
    # Subclasses set self._input_spec / self._output_spec when they open the model.
    _input_spec: TensorSpec
    _output_spec: tuple[TensorSpec, ...]

    @property
    def input_spec(self) -> TensorSpec:
        return self._input_spec

    @property
    def output_spec(self) -> tuple[TensorSpec, ...]:
        return self._output_spec

    def allocator(self) -> Allocator:
        """The memory this device reads without a copy."""
        return HostAllocator()

    @abc.abstractmethod
    def submit(self, inputs: np.ndarray, outputs: dict[str, np.ndarray], n: int | None = None) -> Ticket:
        """Start inference on the first `n` frames (default: all) of `inputs` into preallocated `outputs`.

        `inputs` has input_spec's dtype (zero-copy path); a backend whose input is int8 also takes float32
        and quantises it with the spec's scale.
        """

    @abc.abstractmethod
    def wait(self, ticket: Ticket) -> dict[str, np.ndarray]:
        """Block until `ticket` is done; returns its outputs (the arrays given to submit)."""

    def check_batch(self, inputs: np.ndarray, outputs: dict[str, np.ndarray], n: int | None,
                    input_dtypes: tuple[Any, ...] = (np.float32,)) -> int:
        """Validate one submit() and return n: n frames (default all) of the input frame shape, C-contiguous, in
        one of `input_dtypes`; writeable C-contiguous float32 outputs with room for n rows."""
        spec = self.input_spec
        n = len(inputs) if n is None else int(n)
        if not 0 < n <= spec.shape[0]:
            raise ValueError(f"{self.name}: n={n} outside 1..{spec.shape[0]}")
        if inputs.dtype not in input_dtypes or not inputs.flags.c_contiguous:
            names = "/".join(np.dtype(d).name for d in input_dtypes)
            raise ValueError(f"{self.name}: inputs must be C-contiguous {names}, got {inputs.dtype}")
        if len(inputs) < n or tuple(inputs.shape[1:]) != spec.shape[1:]:
            raise ValueError(f"{self.name}: inputs {inputs.shape} do not hold {n} frames of {spec.shape[1:]}")
        for s in self.output_spec:
            arr = outputs.get(s.name)
            if arr is None:
                raise ValueError(f"{self.name}: outputs lack '{s.name}'")
            if arr.dtype != np.float32 or not arr.flags.c_contiguous or not arr.flags.writeable:
                raise ValueError(f"{self.name}: output '{s.name}' must be writeable C-contiguous float32")
            if len(arr) < n or tuple(arr.shape[1:]) != s.shape[1:]:
                raise ValueError(f"{self.name}: output '{s.name}' {arr.shape} does not hold {n} of {s.shape[1:]}")
        return n

    def telemetry(self) -> dict[str, Any]:
        """Power (W), temperature (C), clocks where a sensor exists, else an explicit reason."""
        return {"power_w": None, "unavailable": f"{self.name}: no power sensor"}

    def close(self) -> None:  # noqa: B027 - optional hook, deliberately a no-op
        """Release device resources."""

    # --- conveniences ----------------------------------------------------------------------------
    def new_outputs(self, allocator: Allocator | None = None) -> dict[str, np.ndarray]:
        """Preallocate one batch of outputs."""
        alloc = allocator or HostAllocator()
        return {s.name: alloc.empty(s.shape, s.dtype) for s in self.output_spec}

    def run_batches(self, count: int, fill: Callable[[int, np.ndarray], int],
                    done: Callable[[int, dict[str, np.ndarray], int], None],
                    inputs: list[np.ndarray] | None = None) -> None:
        """Run `count` batches double-buffered: fill(k, inputs) writes batch k into `inputs` and returns its
        rows; done(k, outputs, rows) gets its results. Batch k+1 is filled and submitted before batch k is
        waited on, so an asynchronous backend (the cpu backend's parallel sessions, a GPU) runs both.
        `inputs`: two input batches (default: zeroed device-visible memory from allocator())."""
        if inputs is None:
            spec, alloc = self.input_spec, self.allocator()
            inputs = [alloc.empty(spec.shape, spec.dtype) for _ in range(2)]
            for buf in inputs:  # rows past a partial batch stay zero, never stale memory
                buf[...] = 0
        outputs = [self.new_outputs(), self.new_outputs()]
        pending: list[tuple[int, Ticket]] = []
        for k in range(count + 2):
            if pending and (len(pending) == 2 or k >= count):  # the oldest: its buffers are refilled next
                j, ticket = pending.pop(0)
                done(j, self.wait(ticket), ticket.n)
            if k < count:
                rows = fill(k, inputs[k % 2])
                pending.append((k, self.submit(inputs[k % 2], outputs[k % 2], n=rows)))

    def infer(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Synchronous inference of any number of frames (chunks of batch_size); for tools and tests."""
        spec = self.input_spec
        x = np.asarray(x)
        if x.ndim == len(spec.shape) - 1:
            x = x[None]
        if tuple(x.shape[1:]) != tuple(spec.shape[1:]):
            raise ValueError(f"{self.name}: input shape {x.shape[1:]} does not match model {spec.shape[1:]}")
        results: dict[str, list[np.ndarray]] = {s.name: [] for s in self.output_spec}
        # An int8 (fix_point) input is quantised by submit() when handed float32: never cast floats to int8 here.
        quantised_input = np.issubdtype(spec.dtype, np.integer) and np.issubdtype(x.dtype, np.floating)
        b = self.batch_size

        def fill(k: int, inputs: np.ndarray) -> int:
            chunk = x[k * b:(k + 1) * b]
            inputs[: len(chunk)] = chunk
            return len(chunk)

        def done(k: int, outputs: dict[str, np.ndarray], rows: int) -> None:
            for name, arr in outputs.items():
                results[name].append(arr[:rows].copy())

        staging = [np.zeros(spec.shape, dtype=np.float32 if quantised_input else spec.dtype) for _ in range(2)]
        self.run_batches(-(-len(x) // b), fill, done, staging)
        return {k: np.concatenate(v) if v else np.empty((0,)) for k, v in results.items()}

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
