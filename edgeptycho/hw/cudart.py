"""One small CUDA binding layer over cuda-python (cuda.bindings.runtime) or pycuda: devices, host/device memory, streams.

cuda-python is the default (wheels exist; an NVIDIA maintainer recommends it over pycuda, TensorRT #2357).
pycuda needs a context per thread: one context is made once and pushed/popped around every call that needs
it (`active()`), which avoids "explicit_context_dependent failed: invalid device context" in worker threads
(TensorRT #475) and "context stack was not empty upon module cleanup" (#2357).
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import BackendUnavailable

BINDINGS = ("cuda-python", "pycuda")


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    major: int
    minor: int
    integrated: bool  # Jetson iGPU: host and device share memory, mapped buffers are zero-copy
    total_bytes: int

    @property
    def compute_capability(self) -> str:
        return f"{self.major}.{self.minor}"


def _import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python 12.x
    return cudart


def open_binding(kind: str | None = None, device: int = 0, who: str = "jetson") -> CudaBinding:
    """The binding named `kind` (default: cuda-python if importable, else pycuda) on GPU `device`."""
    if kind not in (None, *BINDINGS):
        raise ValueError(f"cuda binding must be one of {BINDINGS}, got {kind!r}")
    errors = []
    for name in ([kind] if kind else list(BINDINGS)):
        try:
            return (CudaPython if name == "cuda-python" else PyCuda)(device)
        except ImportError as exc:
            errors.append(f"{name} not importable ({exc})")
    raise BackendUnavailable(who, "; ".join(errors),
                             "pip install 'cuda-python>=12,<13' (JetPack 6: CUDA 12.6), or build pycuda on the device")


class CudaBinding:
    """What the TensorRT backend needs from CUDA; host arrays are numpy, device memory is an int pointer."""

    name = "abstract"
    info: DeviceInfo

    def active(self) -> contextlib.AbstractContextManager:
        """Make the device (context) current on the calling thread for the duration of the block."""
        raise NotImplementedError

    def host_alloc(self, nbytes: int, mapped: bool) -> tuple[np.ndarray, int | None, Any]:
        """Page-locked host bytes; with `mapped`, also the device pointer (zero-copy). Returns (bytes, dptr, handle)."""
        raise NotImplementedError

    def host_free(self, handle: Any) -> None:
        raise NotImplementedError

    def device_alloc(self, nbytes: int) -> tuple[int, Any]:
        raise NotImplementedError

    def device_free(self, handle: Any) -> None:
        raise NotImplementedError

    def stream(self) -> Any:
        raise NotImplementedError

    def stream_handle(self, stream: Any) -> int:
        """The integer cudaStream_t TensorRT's execute_async_v3 takes."""
        raise NotImplementedError

    def stream_destroy(self, stream: Any) -> None:
        raise NotImplementedError

    def synchronize(self, stream: Any) -> None:
        raise NotImplementedError

    def htod_async(self, dst: int, src: np.ndarray, stream: Any) -> None:
        raise NotImplementedError

    def dtoh_async(self, dst: np.ndarray, src: int, stream: Any) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the binding itself holds (pycuda: the context)."""


def device_count(kind: str | None = None) -> tuple[int, str]:
    """(number of CUDA devices, why zero) without creating a context; ImportError if no binding is importable."""
    if kind in (None, "cuda-python"):
        try:
            cudart = _import_cudart()
        except ImportError:
            if kind:
                raise
        else:
            err, n = cudart.cudaGetDeviceCount()
            if err != cudart.cudaError_t.cudaSuccess:
                return 0, f"cudaGetDeviceCount: {getattr(err, 'name', err)}"
            return int(n), "" if n else "cudaGetDeviceCount returned 0"
    import pycuda.driver as cuda

    try:
        cuda.init()
        n = cuda.Device.count()
    except Exception as exc:  # pycuda raises its own RuntimeError/LogicError types
        return 0, f"pycuda: {exc}"
    return n, "" if n else "pycuda: no CUDA device"


class CudaPython(CudaBinding):
    """cuda-python runtime API: every call returns (cudaError_t, results...)."""

    name = "cuda-python"

    def __init__(self, device: int = 0):
        self.rt = _import_cudart()
        self.device = device
        self._call("cudaSetDevice", device)
        try:  # needed for cudaHostGetDevicePointer on pre-UVA setups; harmless (or refused) elsewhere
            self.rt.cudaSetDeviceFlags(self.rt.cudaDeviceMapHost)
        except Exception:  # noqa: BLE001 - cudaErrorSetOnActiveProcess once a context exists
            pass
        prop = self._call("cudaGetDeviceProperties", device)
        name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
        self.info = DeviceInfo(device, name.split("\x00")[0], int(prop.major), int(prop.minor),
                               bool(prop.integrated), int(prop.totalGlobalMem))

    def _call(self, fn: str, *args: Any) -> Any:
        res = getattr(self.rt, fn)(*args)
        err, rest = res[0], res[1:]
        if err != self.rt.cudaError_t.cudaSuccess:
            raise RuntimeError(f"{fn} failed: {getattr(err, 'name', err)}")
        return rest[0] if len(rest) == 1 else (rest or None)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        self._call("cudaSetDevice", self.device)  # the runtime's current device is per thread
        yield

    def host_alloc(self, nbytes: int, mapped: bool) -> tuple[np.ndarray, int | None, Any]:
        flags = self.rt.cudaHostAllocMapped if mapped else self.rt.cudaHostAllocDefault
        ptr = int(self._call("cudaHostAlloc", nbytes, flags))
        host = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))
        dptr = int(self._call("cudaHostGetDevicePointer", ptr, 0)) if mapped else None
        return host, dptr, ptr

    def host_free(self, handle: Any) -> None:
        self._call("cudaFreeHost", handle)

    def device_alloc(self, nbytes: int) -> tuple[int, Any]:
        ptr = int(self._call("cudaMalloc", nbytes))
        return ptr, ptr

    def device_free(self, handle: Any) -> None:
        self._call("cudaFree", handle)

    def stream(self) -> Any:
        return self._call("cudaStreamCreateWithFlags", self.rt.cudaStreamNonBlocking)

    def stream_handle(self, stream: Any) -> int:
        return int(stream)

    def stream_destroy(self, stream: Any) -> None:
        self._call("cudaStreamDestroy", stream)

    def synchronize(self, stream: Any) -> None:
        self._call("cudaStreamSynchronize", stream)

    def htod_async(self, dst: int, src: np.ndarray, stream: Any) -> None:
        self._call("cudaMemcpyAsync", dst, src.ctypes.data, src.nbytes,
                   self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream)

    def dtoh_async(self, dst: np.ndarray, src: int, stream: Any) -> None:
        self._call("cudaMemcpyAsync", dst.ctypes.data, src, dst.nbytes,
                   self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream)


class PyCuda(CudaBinding):
    """pycuda driver API with one explicit context, pushed/popped per call on whichever thread makes it."""

    name = "pycuda"

    def __init__(self, device: int = 0):
        import pycuda.driver as cuda

        self.cuda = cuda
        cuda.init()
        dev = cuda.Device(device)
        # MAP_HOST: mapped pinned memory needs it on a manually made context (reference: buffers §3).
        self.ctx = dev.make_context(cuda.ctx_flags.MAP_HOST)
        try:
            major, minor = dev.compute_capability()
            self.info = DeviceInfo(device, dev.name(), major, minor,
                                   bool(dev.get_attribute(cuda.device_attribute.INTEGRATED)), dev.total_memory())
        finally:
            cuda.Context.pop()  # made current on this thread only; active() pushes it wherever it is needed

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        self.ctx.push()
        try:
            yield
        finally:
            self.cuda.Context.pop()

    def host_alloc(self, nbytes: int, mapped: bool) -> tuple[np.ndarray, int | None, Any]:
        flags = self.cuda.host_alloc_flags.DEVICEMAP | self.cuda.host_alloc_flags.PORTABLE if mapped else 0
        with self.active():
            host = self.cuda.pagelocked_empty((nbytes,), np.uint8, mem_flags=flags)
            dptr = int(host.base.get_device_pointer()) if mapped else None
        return host, dptr, host

    def host_free(self, handle: Any) -> None:
        with self.active():
            handle.base.free()

    def device_alloc(self, nbytes: int) -> tuple[int, Any]:
        with self.active():
            alloc = self.cuda.mem_alloc(nbytes)
        return int(alloc), alloc

    def device_free(self, handle: Any) -> None:
        with self.active():
            handle.free()

    def stream(self) -> Any:
        with self.active():
            return self.cuda.Stream()

    def stream_handle(self, stream: Any) -> int:
        return int(stream.handle)

    def stream_destroy(self, stream: Any) -> None:
        pass  # pycuda destroys a Stream when the object is collected

    def synchronize(self, stream: Any) -> None:
        with self.active():
            stream.synchronize()

    def htod_async(self, dst: int, src: np.ndarray, stream: Any) -> None:
        with self.active():
            self.cuda.memcpy_htod_async(dst, src, stream)

    def dtoh_async(self, dst: np.ndarray, src: int, stream: Any) -> None:
        with self.active():
            self.cuda.memcpy_dtoh_async(dst, src, stream)

    def close(self) -> None:
        if self.ctx is not None:
            self.ctx.detach()
            self.ctx = None
