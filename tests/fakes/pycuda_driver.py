"""Fake `pycuda.driver` over the simulated device in devmem, including pycuda's per-thread context stack.

Mirrors the pycuda driver API as documented (documen.tician.de/pycuda/driver.html) and as used in
reference/deployment-toolchains.md and buffers-and-rdma.md §3: init(), Device(i).name() /
compute_capability() / get_attribute(device_attribute.INTEGRATED) / total_memory() / make_context(flags),
Device.count(), Context.push() / Context.pop() / detach(), pagelocked_empty(shape, dtype,
mem_flags=host_alloc_flags.DEVICEMAP) whose `.base` is a HostAllocation with get_device_pointer() and free(),
mem_alloc() → DeviceAllocation (int() is the pointer), memcpy_htod_async / memcpy_dtoh_async, Stream()
with .handle and synchronize(). Every call that needs a context raises LogicError("explicit_context_dependent
failed: invalid device context ...") when the calling thread has none current — the TensorRT #475 failure.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np

from . import devmem


class LogicError(RuntimeError):
    pass


class ctx_flags:  # noqa: N801
    SCHED_AUTO = 0
    MAP_HOST = 8


class host_alloc_flags:  # noqa: N801
    PORTABLE = 1
    DEVICEMAP = 2
    WRITECOMBINED = 4


class device_attribute:  # noqa: N801
    INTEGRATED = "INTEGRATED"
    CAN_MAP_HOST_MEMORY = "CAN_MAP_HOST_MEMORY"


_tls = threading.local()
_initialized = False


def _stack() -> list:
    if not hasattr(_tls, "stack"):
        _tls.stack = []
    return _tls.stack


def _need_context(what: str) -> Context:
    if not _stack():
        raise LogicError(f"{what}: explicit_context_dependent failed: invalid device context - "
                         "no currently active context?")
    return _stack()[-1]


def init(flags: int = 0) -> None:
    global _initialized
    if devmem.STATE.device.count == 0:
        raise LogicError("cuInit failed: no CUDA-capable device is detected")
    _initialized = True


class Context:
    def __init__(self, device: Device, flags: int):
        self.device, self.flags, self.detached = device, flags, False

    def push(self) -> None:
        if self.detached:
            raise LogicError("cuCtxPushCurrent failed: invalid context (detached)")
        _stack().append(self)

    @staticmethod
    def pop() -> None:
        if not _stack():
            raise LogicError("cuCtxPopCurrent failed: invalid context")
        _stack().pop()

    @staticmethod
    def get_current():
        return _stack()[-1] if _stack() else None

    def detach(self) -> None:
        if self in _stack():
            _stack().remove(self)
        self.detached = True


class Device:
    def __init__(self, index: int):
        if not _initialized:
            raise LogicError("cuDeviceGet failed: initialization error (call pycuda.driver.init() first)")
        if not 0 <= index < devmem.STATE.device.count:
            raise LogicError(f"cuDeviceGet failed: invalid device ordinal {index}")
        self.index = index

    @staticmethod
    def count() -> int:
        if not _initialized:
            raise LogicError("cuDeviceGetCount failed: initialization error")
        return devmem.STATE.device.count

    def name(self) -> str:
        return devmem.STATE.device.name

    def compute_capability(self) -> tuple[int, int]:
        return devmem.STATE.device.major, devmem.STATE.device.minor

    def total_memory(self) -> int:
        return devmem.STATE.device.total_bytes

    def get_attribute(self, attr: str) -> int:
        return {"INTEGRATED": int(devmem.STATE.device.integrated), "CAN_MAP_HOST_MEMORY": 1}[attr]

    def make_context(self, flags: int = 0) -> Context:
        ctx = Context(self, flags)
        ctx.push()
        return ctx


def pagelocked_empty(shape, dtype, order: str = "C", mem_flags: int = 0) -> np.ndarray:
    ctx = _need_context("pagelocked_empty")
    mapped = bool(mem_flags & host_alloc_flags.DEVICEMAP)
    if mapped and not ctx.flags & ctx_flags.MAP_HOST:
        raise LogicError("cuMemHostAlloc failed: DEVICEMAP needs a context made with ctx_flags.MAP_HOST")
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    nbytes = max(int(np.prod(shape)) * np.dtype(dtype).itemsize, 1)
    a = devmem.alloc(nbytes, "mapped" if mapped else "pinned")
    host = _host_allocation_type(nbytes).from_address(a.addr)
    host._alloc, host._mapped = a, mapped
    return np.ndarray(shape, dtype=dtype, buffer=host, order=order)


def _host_allocation_type(nbytes: int):
    def get_device_pointer(self) -> int:
        _need_context("HostAllocation.get_device_pointer")
        if not self._mapped:
            raise LogicError("cuMemHostGetDevicePointer failed: memory was not allocated with DEVICEMAP")
        return self._alloc.addr

    def free(self) -> None:
        _need_context("HostAllocation.free")
        devmem.free(self._alloc.addr, ("mapped", "pinned"))

    return type("HostAllocation", (ctypes.c_uint8 * nbytes,),
                {"get_device_pointer": get_device_pointer, "free": free})


class DeviceAllocation:
    def __init__(self, alloc: devmem.Allocation):
        self._alloc = alloc

    def __int__(self) -> int:
        return self._alloc.addr

    def free(self) -> None:
        _need_context("DeviceAllocation.free")
        devmem.free(self._alloc.addr, ("device",))


def mem_alloc(nbytes: int) -> DeviceAllocation:
    _need_context("mem_alloc")
    return DeviceAllocation(devmem.alloc(int(nbytes), "device"))


class Stream:
    def __init__(self, flags: int = 0):
        _need_context("Stream")
        self.handle = devmem.new_stream()

    def synchronize(self) -> None:
        _need_context("Stream.synchronize")
        devmem.synchronize(self.handle)


def _ptr(dev) -> int:
    return int(dev)


def memcpy_htod_async(dest, src: np.ndarray, stream: Stream | None = None) -> None:
    _need_context("memcpy_htod_async")
    devmem.record("memcpy_htod_async")
    if not src.flags.c_contiguous:
        raise LogicError("memcpy_htod_async: source must be contiguous")
    devmem.copy_async(stream.handle, _ptr(dest), src.ctypes.data, src.nbytes, ("device",), None)


def memcpy_dtoh_async(dest: np.ndarray, src, stream: Stream | None = None) -> None:
    _need_context("memcpy_dtoh_async")
    devmem.record("memcpy_dtoh_async")
    if not dest.flags.c_contiguous:
        raise LogicError("memcpy_dtoh_async: destination must be contiguous")
    devmem.copy_async(stream.handle, dest.ctypes.data, _ptr(src), dest.nbytes, None, ("device",))
