"""Fake `cuda.bindings.runtime` (cuda-python 12.x runtime API) over the simulated device in devmem.

Mirrors the calling convention documented for cuda-python's runtime bindings and used by NVIDIA's TensorRT
Python samples (common_runtime.py): every function returns a tuple whose first element is a cudaError_t
(IntEnum), followed by the results; pointers are Python ints; streams are cudaStream_t objects convertible
with int(). Covered: cudaGetDeviceCount, cudaGetDeviceProperties, cudaSetDevice, cudaSetDeviceFlags,
cudaHostAlloc (+ cudaHostAllocDefault/Portable/Mapped), cudaHostGetDevicePointer, cudaFreeHost, cudaMalloc,
cudaFree, cudaStreamCreateWithFlags, cudaStreamSynchronize, cudaStreamDestroy, cudaMemcpyAsync, cudaGetErrorString.
Without a device, cudaGetDeviceCount returns cudaErrorNoDevice (reference/deployment-toolchains.md).
"""

from __future__ import annotations

import enum
import threading

from . import devmem


class cudaError_t(enum.IntEnum):  # noqa: N801 - mirrors the binding's names
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100
    cudaErrorInvalidDevice = 101
    cudaErrorInvalidResourceHandle = 400
    cudaErrorIllegalAddress = 700


class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3
    cudaMemcpyDefault = 4


cudaHostAllocDefault = 0
cudaHostAllocPortable = 1
cudaHostAllocMapped = 2
cudaHostAllocWriteCombined = 4
cudaDeviceMapHost = 8
cudaStreamDefault = 0
cudaStreamNonBlocking = 1

_ok = cudaError_t.cudaSuccess
_current = threading.local()


class cudaStream_t:  # noqa: N801
    def __init__(self, handle: int):
        self._handle = handle

    def __int__(self) -> int:
        return self._handle

    def getPtr(self) -> int:  # noqa: N802
        return self._handle


class cudaDeviceProp:  # noqa: N801
    def __init__(self, cfg: devmem.DeviceConfig):
        self.name = cfg.name.encode() + b"\x00" * (256 - len(cfg.name))
        self.major, self.minor = cfg.major, cfg.minor
        self.integrated = int(cfg.integrated)
        self.canMapHostMemory = 1
        self.totalGlobalMem = cfg.total_bytes


def _ints(*values: object) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def cudaGetDeviceCount():  # noqa: N802
    devmem.record("cudaGetDeviceCount")
    n = devmem.STATE.device.count
    return (_ok, n) if n else (cudaError_t.cudaErrorNoDevice, 0)


def cudaGetDeviceProperties(device):  # noqa: N802
    if not _ints(device) or not 0 <= device < devmem.STATE.device.count:
        return cudaError_t.cudaErrorInvalidDevice, None
    return _ok, cudaDeviceProp(devmem.STATE.device)


def cudaSetDevice(device):  # noqa: N802
    if not _ints(device) or not 0 <= device < devmem.STATE.device.count:
        return (cudaError_t.cudaErrorInvalidDevice,)
    _current.device = device
    return (_ok,)


def cudaSetDeviceFlags(flags):  # noqa: N802
    return (_ok,) if _ints(flags) else (cudaError_t.cudaErrorInvalidValue,)


def _device_ready() -> bool:
    return devmem.STATE.device.count > 0 and getattr(_current, "device", None) is not None


def cudaHostAlloc(size, flags):  # noqa: N802
    devmem.record(f"cudaHostAlloc(mapped={bool(flags & cudaHostAllocMapped) if _ints(flags) else '?'})")
    if not _ints(size, flags) or size <= 0 or flags & ~7:
        return cudaError_t.cudaErrorInvalidValue, 0
    if not _device_ready():
        return cudaError_t.cudaErrorNoDevice, 0
    return _ok, devmem.alloc(size, "mapped" if flags & cudaHostAllocMapped else "pinned").addr


def cudaHostGetDevicePointer(pHost, flags):  # noqa: N802, N803
    if not _ints(pHost, flags) or flags != 0:
        return cudaError_t.cudaErrorInvalidValue, 0
    try:
        devmem.find(pHost, 1, ("mapped",))
    except devmem.FakeCudaError:
        return cudaError_t.cudaErrorInvalidValue, 0
    return _ok, pHost  # unified addressing: the device pointer equals the host pointer


def cudaFreeHost(ptr):  # noqa: N802
    try:
        devmem.free(ptr, ("mapped", "pinned"))
    except devmem.FakeCudaError:
        return (cudaError_t.cudaErrorInvalidValue,)
    return (_ok,)


def cudaMalloc(size):  # noqa: N802
    devmem.record("cudaMalloc")
    if not _ints(size) or size <= 0:
        return cudaError_t.cudaErrorInvalidValue, 0
    if not _device_ready():
        return cudaError_t.cudaErrorNoDevice, 0
    return _ok, devmem.alloc(size, "device").addr


def cudaFree(ptr):  # noqa: N802
    try:
        devmem.free(ptr, ("device",))
    except devmem.FakeCudaError:
        return (cudaError_t.cudaErrorInvalidValue,)
    return (_ok,)


def cudaStreamCreateWithFlags(flags):  # noqa: N802
    if not _ints(flags):
        return cudaError_t.cudaErrorInvalidValue, None
    return _ok, cudaStream_t(devmem.new_stream())


def _stream(stream) -> int | None:
    if not isinstance(stream, cudaStream_t) or int(stream) not in devmem.STATE.streams:
        return None
    return int(stream)


def cudaStreamSynchronize(stream):  # noqa: N802
    handle = _stream(stream)
    if handle is None:
        return (cudaError_t.cudaErrorInvalidResourceHandle,)
    try:
        devmem.synchronize(handle)
    except devmem.FakeCudaError:
        return (cudaError_t.cudaErrorIllegalAddress,)
    return (_ok,)


def cudaStreamDestroy(stream):  # noqa: N802
    handle = _stream(stream)
    if handle is None:
        return (cudaError_t.cudaErrorInvalidResourceHandle,)
    devmem.destroy_stream(handle)
    return (_ok,)


def cudaMemcpyAsync(dst, src, count, kind, stream):  # noqa: N802
    devmem.record(f"cudaMemcpyAsync({cudaMemcpyKind(kind).name if isinstance(kind, cudaMemcpyKind) else kind})")
    handle = _stream(stream)
    if handle is None:
        return (cudaError_t.cudaErrorInvalidResourceHandle,)
    if not _ints(dst, src, count) or not isinstance(kind, cudaMemcpyKind):
        return (cudaError_t.cudaErrorInvalidValue,)
    try:
        if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
            devmem.copy_async(handle, dst, src, count, ("device",), None)
        elif kind == cudaMemcpyKind.cudaMemcpyDeviceToHost:
            devmem.copy_async(handle, dst, src, count, None, ("device",))
        else:
            return (cudaError_t.cudaErrorInvalidValue,)
    except devmem.FakeCudaError:
        return (cudaError_t.cudaErrorInvalidValue,)
    return (_ok,)


def cudaGetErrorString(error):  # noqa: N802
    return _ok, cudaError_t(error).name.encode()
