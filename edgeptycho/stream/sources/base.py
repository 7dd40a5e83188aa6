"""The Source interface (frames into ring slots), its counters, the pacing clock and the frame wire header."""

from __future__ import annotations

import abc
import math
import struct
import threading
import time
import zlib
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Protocol

import numpy as np

__all__ = [
    "DTYPE_CODES", "END_SERIES", "END_STREAM", "DROPPED", "HEADER", "MAGIC", "Pacer", "RingWriter", "Source",
    "SourceStats", "SourceUnavailable", "WireHeader", "decode_header", "encode_header",
]


class SourceUnavailable(RuntimeError):
    """A source's library or device is missing; `reason` says what, `fix` says how to get it."""

    def __init__(self, source: str, reason: str, fix: str = ""):
        self.source, self.reason, self.fix = source, reason, fix
        super().__init__(f"source '{source}' unavailable: {reason}" + (f" — fix: {fix}" if fix else ""))


class RingWriter(Protocol):
    """The producer half of FrameRing. Sources write through it only, so the same Source runs into a local
    ring, into a shared-memory ring from another process (ShmProducer) or onto a socket (TcpSender)."""

    frame_shape: tuple[int, ...]
    dtype: np.dtype
    policy: str
    timeout_s: float | None

    def acquire_write(self, timeout: float | None = None, stop: threading.Event | None = None) -> int | None: ...
    def slot_view(self, slot: int) -> np.ndarray: ...
    def slot_buffer(self, slot: int) -> memoryview: ...
    def commit(self, slot: int, frame_id: int, **meta: Any) -> None: ...
    def abort(self, slot: int) -> None: ...
    def drop(self, frame_id: int) -> None: ...
    def mark_end(self, series_id: int = 0) -> None: ...
    def close_input(self) -> None: ...


@dataclass
class SourceStats:
    """sent = frames offered to the ring; received = committed; dropped = no slot (policy); malformed = garbage
    (headers, shapes, payloads) that could not become a frame. received + dropped == sent."""

    sent: int = 0
    received: int = 0
    dropped: int = 0
    malformed: int = 0
    skipped_bytes: int = 0
    late: int = 0  # paced sources: frames emitted more than one period after their deadline

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Source(abc.ABC):
    """Writes frames into ring slots and commits their metadata until the data ends or `stop` is set.

    run() marks the end of each series (ring.mark_end) and, when the source is finished, closes the ring's
    input (ring.close_input) so a consumer can flush its last partial batch and stop.
    """

    name: ClassVar[str] = "abstract"

    def __init__(self) -> None:
        self.stats = SourceStats()

    @classmethod
    def probe(cls) -> None:
        """Raise SourceUnavailable (reason + fix) if a library or device this source needs is missing."""
        return None

    def frame_spec(self) -> tuple[tuple[int, int], np.dtype] | None:
        """(frame shape, dtype) when known before run() (files, arrays), to size the ring; else None."""
        return None

    @abc.abstractmethod
    def run(self, ring: RingWriter, stop: threading.Event) -> SourceStats:
        """Fill `ring` until done or `stop` is set; returns the counters."""

    def start(self, ring: RingWriter, stop: threading.Event | None = None) -> tuple[threading.Thread, threading.Event]:
        """Run in a daemon thread; returns (thread, stop event)."""
        stop = stop or threading.Event()
        thread = threading.Thread(target=self.run, args=(ring, stop), name=f"source-{self.name}", daemon=True)
        thread.start()
        return thread, stop

    def counters(self) -> dict[str, int]:
        return self.stats.as_dict()

    def mask_for(self, series_id: int) -> np.ndarray | None:
        """The detector pixel mask (nonzero = bad) of series `series_id`, when the stream carries one."""
        return None


class Pacer:
    """Absolute-deadline clock: frame i is due at t0 + i / rate, so sleep overshoot never accumulates."""

    def __init__(self, rate_hz: float | None):
        if rate_hz is not None and rate_hz <= 0:
            raise ValueError(f"rate_hz must be > 0 or None (as fast as possible), got {rate_hz}")
        self.period = 1.0 / rate_hz if rate_hz else 0.0
        self.i = 0
        self.late = 0
        self._t0 = self._epoch0 = 0.0

    def wait(self, stop: threading.Event | None = None) -> float:
        """Sleep until the next frame is due; returns its due time (Unix epoch s), NaN when unpaced."""
        if not self.period:
            return math.nan
        now = time.perf_counter()
        if self.i == 0:
            self._t0, self._epoch0 = now, time.time()
        due = self._t0 + self.i * self.period
        self.i += 1
        delay = due - now
        if delay > 0.002 and stop is not None:
            stop.wait(delay)  # long waits stay responsive to stop
        elif delay > 0:
            time.sleep(delay)
        elif delay < -self.period:
            self.late += 1
        return self._epoch0 + (due - self._t0)


# --- the frame wire header (TCP stream, shm and RDMA records) ---------------------------------------------
# 96 bytes, little-endian, packed. A frame = header + nbytes of raw row-major payload. crc = CRC-32 of
# bytes 0..91. Control messages (END_SERIES, END_STREAM, DROPPED) carry nbytes = 0.
MAGIC = b"EPF1"
VERSION = 1
END_SERIES, END_STREAM, DROPPED = 1, 2, 4
HEADER = struct.Struct("<4sHBBiqqIIQdddddd")  # magic..t_sent; crc appended separately
_CRC = struct.Struct("<I")
HEADER_SIZE = HEADER.size + _CRC.size
assert HEADER_SIZE == 96
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype("u1"), 2: np.dtype("<u2"), 3: np.dtype("<u4"), 4: np.dtype("i1"), 5: np.dtype("<i2"),
    6: np.dtype("<i4"), 7: np.dtype("<f2"), 8: np.dtype("<f4"), 9: np.dtype("<f8"), 10: np.dtype("<u8"),
    11: np.dtype("<i8"),
}
_CODE_OF = {dt.str.replace("|", "<"): code for code, dt in DTYPE_CODES.items()}


def dtype_code(dtype: Any) -> int:
    dt = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).byteorder == ">" else np.dtype(dtype)
    try:
        return _CODE_OF[dt.str.replace("|", "<")]
    except KeyError:
        raise ValueError(f"dtype {dt} has no wire code (known: {[d.name for d in DTYPE_CODES.values()]})") from None


@dataclass
class WireHeader:
    """A decoded header. slot = -1 on TCP; position/t_detector NaN when unknown."""

    flags: int
    slot: int
    frame_id: int
    series_id: int
    shape: tuple[int, int]
    dtype: np.dtype | None
    nbytes: int
    position_px: tuple[float, float]
    position_m: tuple[float, float]
    t_detector: float
    t_sent: float


def encode_header(buf: memoryview | bytearray, frame_id: int, *, shape: tuple[int, int] = (0, 0),
                  dtype: Any = None, nbytes: int = 0, flags: int = 0, slot: int = -1, series_id: int = 0,
                  position_px: Any = (math.nan, math.nan), position_m: Any = (math.nan, math.nan),
                  t_detector: float = math.nan, t_sent: float | None = None) -> None:
    """Write a 96-byte header into `buf` (preallocated: no per-frame allocation)."""
    code = dtype_code(dtype) if dtype is not None else 0
    HEADER.pack_into(buf, 0, MAGIC, VERSION, code, flags, slot, frame_id, series_id, shape[0], shape[1], nbytes,
                     position_px[0], position_px[1], position_m[0], position_m[1], t_detector,
                     time.time() if t_sent is None else t_sent)
    _CRC.pack_into(buf, HEADER.size, zlib.crc32(memoryview(buf)[:HEADER.size]))


def decode_header(buf: memoryview | bytes | bytearray) -> WireHeader | str:
    """The header in buf[:96], or a string saying why it is not one (garbage never raises)."""
    if bytes(buf[:4]) != MAGIC:
        return "bad magic"
    if _CRC.unpack_from(buf, HEADER.size)[0] != zlib.crc32(memoryview(buf)[:HEADER.size]):
        return "bad header checksum"
    (_, version, code, flags, slot, frame_id, series_id, h, w, nbytes,
     py, px, my, mx, t_det, t_sent) = HEADER.unpack_from(buf, 0)
    if version != VERSION:
        return f"unsupported header version {version}"
    dtype = DTYPE_CODES.get(code)
    if code and dtype is None:
        return f"unknown dtype code {code}"
    if not flags & (END_SERIES | END_STREAM | DROPPED):
        if dtype is None or nbytes != h * w * dtype.itemsize:
            return f"payload size {nbytes} does not match shape {h}x{w} of dtype code {code}"
    return WireHeader(flags, slot, frame_id, series_id, (h, w), dtype, nbytes, (py, px), (my, mx), t_det, t_sent)
