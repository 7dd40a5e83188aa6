"""Simulated CUDA device: allocations, streams and a call log shared by the fake cuda-python, pycuda and tensorrt.

Device memory is host memory underneath, but the fakes only let it be reached the way CUDA allows: kernels
(the fake TensorRT) accept device or mapped pointers of live allocations; asynchronous copies and engine
launches are queued on a stream and run only when that stream is synchronised, so an adapter that reads
results early, or frees/reuses a buffer before the work finished, gets wrong numbers or an error here.
Freed allocations are kept in a graveyard so a stale numpy view fails a check instead of crashing Python.
"""

from __future__ import annotations

import ctypes
import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class FakeCudaError(RuntimeError):
    """What a real GPU would report as an illegal address or invalid value."""


@dataclass
class Allocation:
    addr: int
    nbytes: int
    kind: str  # "device" | "pinned" | "mapped"
    buf: Any
    alive: bool = True


@dataclass
class DeviceConfig:
    count: int = 1
    name: str = "Orin (nvgpu)"
    major: int = 8
    minor: int = 7
    integrated: bool = True
    total_bytes: int = 64 << 30


@dataclass
class _State:
    device: DeviceConfig = field(default_factory=DeviceConfig)
    allocations: dict[int, Allocation] = field(default_factory=dict)
    graveyard: list[Allocation] = field(default_factory=list)
    streams: dict[int, list[Callable[[], None]]] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)  # API calls in order, for assertions
    lock: threading.Lock = field(default_factory=threading.Lock)


STATE = _State()
_handles = itertools.count(0x1000)


def reset(**device: Any) -> DeviceConfig:
    """Forget every allocation and stream; configure the simulated GPU (DeviceConfig fields)."""
    global STATE
    STATE = _State(device=DeviceConfig(**device))
    return STATE.device


def record(call: str) -> None:
    STATE.calls.append(call)


def alloc(nbytes: int, kind: str) -> Allocation:
    if not isinstance(nbytes, int) or nbytes <= 0:
        raise FakeCudaError(f"allocation size must be a positive int, got {nbytes!r}")
    buf = (ctypes.c_uint8 * nbytes)()
    a = Allocation(ctypes.addressof(buf), nbytes, kind, buf)
    with STATE.lock:
        STATE.allocations[a.addr] = a
    return a


def free(addr: int, kinds: tuple[str, ...]) -> None:
    with STATE.lock:
        a = STATE.allocations.pop(int(addr), None)
    if a is None or a.kind not in kinds:
        raise FakeCudaError(f"free of {addr:#x}: not a live {'/'.join(kinds)} allocation")
    a.alive = False
    STATE.graveyard.append(a)


def find(addr: int, nbytes: int, kinds: tuple[str, ...]) -> Allocation:
    """The live allocation holding [addr, addr+nbytes) of one of `kinds`, else FakeCudaError."""
    if not isinstance(addr, int) or isinstance(addr, bool):
        raise FakeCudaError(f"pointer must be an int, got {type(addr).__name__}")
    for a in list(STATE.allocations.values()):
        if a.addr <= addr < a.addr + a.nbytes:
            if a.kind not in kinds:
                raise FakeCudaError(f"{addr:#x} is {a.kind} memory; this access needs {'/'.join(kinds)}")
            if addr + nbytes > a.addr + a.nbytes:
                raise FakeCudaError(f"access of {nbytes} bytes at {addr:#x} overruns a {a.nbytes}-byte allocation")
            return a
    dead = any(a.addr <= addr < a.addr + a.nbytes for a in STATE.graveyard)
    raise FakeCudaError(f"illegal address {addr:#x}" + (" (freed)" if dead else " (never allocated)"))


def view(addr: int, nbytes: int) -> np.ndarray:
    """uint8 view of simulated memory (for the fakes' own kernels and copies)."""
    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(addr))


def host_view(addr: int, nbytes: int) -> np.ndarray:
    """Any host memory (pageable numpy arrays included) as uint8."""
    return view(addr, nbytes)


def new_stream() -> int:
    handle = next(_handles)
    STATE.streams[handle] = []
    return handle


def enqueue(handle: int, op: Callable[[], None]) -> None:
    if handle not in STATE.streams:
        raise FakeCudaError(f"invalid stream handle {handle!r}")
    STATE.streams[handle].append(op)


def synchronize(handle: int) -> None:
    """Run the stream's queued work in order (this is when copies and kernels 'happen')."""
    if handle not in STATE.streams:
        raise FakeCudaError(f"invalid stream handle {handle!r}")
    queue = STATE.streams[handle]
    while queue:
        queue.pop(0)()


def destroy_stream(handle: int) -> None:
    synchronize(handle)
    STATE.streams.pop(handle, None)


def copy_async(handle: int, dst: int, src: int, nbytes: int, dst_kinds: tuple[str, ...] | None,
               src_kinds: tuple[str, ...] | None) -> None:
    """Queue a copy; kinds None means any host address (pageable memory, as cudaMemcpyAsync allows)."""

    def check() -> None:
        if dst_kinds is not None:
            find(dst, nbytes, dst_kinds)
        if src_kinds is not None:
            find(src, nbytes, src_kinds)

    check()

    def op() -> None:  # re-checked at run time: freeing a buffer before the copy ran is a bug
        check()
        view(dst, nbytes)[:] = host_view(src, nbytes)

    enqueue(handle, op)
