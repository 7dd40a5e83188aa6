"""Device-visible allocators: shared memory across processes, CUDA mapped (zero-copy) and pinned host memory."""

from __future__ import annotations

import bisect
import sys
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import numpy as np

from .base import Allocator
from .cudart import CudaBinding


class _RangeIndex:
    """Which allocation a host address falls in, by bisection over sorted start addresses."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.items: list[tuple[int, int, Any]] = []  # (start, nbytes, payload)

    def add(self, start: int, nbytes: int, payload: Any) -> None:
        i = bisect.bisect(self.starts, start)
        self.starts.insert(i, start)
        self.items.insert(i, (start, nbytes, payload))

    def find(self, addr: int, nbytes: int) -> tuple[int, Any] | None:
        """(offset into the allocation, payload) when [addr, addr+nbytes) lies inside one allocation."""
        i = bisect.bisect(self.starts, addr) - 1
        if i < 0:
            return None
        start, size, payload = self.items[i]
        return (addr - start, payload) if addr + nbytes <= start + size else None

    def clear(self) -> None:
        self.starts.clear()
        self.items.clear()


def _view(raw: np.ndarray, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    return raw[: count * dtype.itemsize].view(dtype).reshape(shape)


class CudaHostAllocator(Allocator):
    """Page-locked host memory from one CUDA binding; `mapped` adds a device pointer (zero-copy on Jetson).

    Mapped (cudaHostAllocMapped + cudaHostGetDevicePointer): the integrated GPU reads the pages directly, so a
    ring slot allocated here *is* the TensorRT input. Pinned (not mapped): DMA-able for cudaMemcpyAsync on a
    discrete GPU. Arrays are invalid after close().
    """

    def __init__(self, cuda: CudaBinding, mapped: bool):
        self.cuda, self.mapped = cuda, mapped
        self.name = "cuda-mapped" if mapped else "cuda-pinned"
        self._index = _RangeIndex()
        self._handles: list[Any] = []

    @property
    def zero_copy(self) -> bool:  # type: ignore[override]
        return self.mapped

    def empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        nbytes = max(int(np.prod(shape)) * np.dtype(dtype).itemsize, 1)
        raw, dptr, handle = self.cuda.host_alloc(nbytes, self.mapped)
        self._handles.append(handle)
        self._index.add(raw.ctypes.data, nbytes, dptr)
        return _view(raw, shape, dtype)

    def owns(self, array: np.ndarray) -> bool:
        """True when `array` lies entirely in page-locked memory from this allocator."""
        return self._index.find(array.ctypes.data, array.nbytes) is not None

    def device_pointer(self, array: np.ndarray) -> int | None:
        hit = self._index.find(array.ctypes.data, array.nbytes)
        if hit is None or hit[1] is None:
            return None
        offset, dptr = hit
        return dptr + offset

    def close(self) -> None:
        for handle in self._handles:
            self.cuda.host_free(handle)
        self._handles.clear()
        self._index.clear()


class SharedMemoryAllocator(Allocator):
    """Named POSIX shared memory: a producer process allocates ring slots, consumers attach by name.

    The CPU backend reads these pages directly (zero-copy). `names[i]` is the segment of the i-th array;
    another process calls ``SharedMemoryAllocator.attach(name, shape, dtype)``. close() unlinks the segments.
    """

    name = "shared-memory"
    zero_copy = True

    def __init__(self) -> None:
        self._segments: list[shared_memory.SharedMemory] = []

    @property
    def names(self) -> list[str]:
        return [s.name for s in self._segments]

    def empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        nbytes = max(int(np.prod(shape)) * np.dtype(dtype).itemsize, 1)
        seg = shared_memory.SharedMemory(create=True, size=nbytes)
        self._segments.append(seg)
        return np.ndarray(shape, dtype=dtype, buffer=seg.buf)

    @staticmethod
    def attach(name: str, shape: tuple[int, ...], dtype: Any) -> tuple[shared_memory.SharedMemory, np.ndarray]:
        """Map an existing segment; keep the returned SharedMemory alive as long as the array is used."""
        # A child started by multiprocessing shares its parent's tracker (inherited fd): unregistering there
        # would also drop the creator's registration (and make its unlink print a KeyError from the tracker).
        shared_tracker = getattr(resource_tracker._resource_tracker, "_fd", None) is not None
        seg = shared_memory.SharedMemory(name=name)
        if sys.version_info < (3, 13) and not shared_tracker:
            # Before 3.13 an attaching process registers the segment with its resource tracker, which unlinks
            # it when that process exits — under the producer's feet. Only the creator should unlink.
            resource_tracker.unregister(seg._name, "shared_memory")  # type: ignore[attr-defined]
        need = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if seg.size < need:
            seg.close()
            raise ValueError(f"shared memory '{name}' holds {seg.size} bytes, {shape} {np.dtype(dtype)} needs {need}")
        return seg, np.ndarray(shape, dtype=dtype, buffer=seg.buf)

    def close(self) -> None:
        for seg in self._segments:
            try:
                seg.close()
            except BufferError:
                pass  # arrays still reference the mapping; the pages go when they do
            seg.unlink()
        self._segments.clear()
