"""Plain TCP frame receiver writing payloads with recv_into straight into ring slots, and its sender.

Wire format (docs/results-stream.md, "Frame ingest"): each frame is the 96-byte header of sources.base
(magic b"EPF1", version, dtype code, flags, frame id, series id, shape, nbytes, positions, times, CRC-32)
followed by nbytes of raw little-endian row-major pixels. END_SERIES / END_STREAM headers carry no payload.
Bytes that do not form a valid header are counted (malformed, skipped_bytes) and skipped until the next
magic; a valid header for a frame that does not fit the ring is counted and its payload discarded.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
from typing import Any

import numpy as np

from ..ring import FrameRing, RingClosed
from .base import (
    END_SERIES,
    END_STREAM,
    HEADER_SIZE,
    MAGIC,
    Source,
    SourceStats,
    WireHeader,
    decode_header,
    encode_header,
)

log = logging.getLogger(__name__)
_POLL_S = 0.1  # socket timeout: how often a blocked receive looks at the stop event


class _Disconnected(Exception):
    pass


class TcpSource(Source):
    """Listens on host:port (127.0.0.1 by default), serves one sender connection at a time.

    A connection ends at END_STREAM (then run() returns and the ring's input closes) or at disconnect (then
    the next connection is awaited, unless end_on_disconnect). max_payload bounds what a bad header may make
    us drain before the connection is dropped instead.
    """

    name = "tcp"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, end_on_disconnect: bool = False,
                 max_payload: int = 1 << 30):
        super().__init__()
        self._listener = socket.create_server((host, port))
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self.end_on_disconnect, self.max_payload = end_on_disconnect, max_payload
        self.connections = 0

    def run(self, ring: FrameRing, stop: threading.Event) -> SourceStats:  # type: ignore[override]
        self._listener.settimeout(_POLL_S)
        scratch = np.empty(max(ring.slot_nbytes, 1 << 16), np.uint8)  # where dropped payloads land
        try:
            while not stop.is_set():
                try:
                    conn, peer = self._listener.accept()
                except TimeoutError:
                    continue
                self.connections += 1
                with conn:
                    conn.settimeout(_POLL_S)
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                    try:
                        if self._serve(conn, ring, stop, memoryview(scratch)):
                            break
                    except _Disconnected:
                        log.info("tcp source: %s disconnected", peer)
                if self.end_on_disconnect:
                    break
        except RingClosed:
            log.info("tcp source: ring closed by its owner")
        finally:
            ring.close_input()
        return self.stats

    def _serve(self, conn: socket.socket, ring: FrameRing, stop: threading.Event, scratch: memoryview) -> bool:
        """Receive frames until END_STREAM (True) or stop (False); raises _Disconnected."""
        stats, hbuf = self.stats, bytearray(HEADER_SIZE)
        hview, have, in_garbage = memoryview(hbuf), 0, False
        while not stop.is_set():
            have = self._fill(conn, hview, have, stop)
            if have < HEADER_SIZE:
                return False
            h = decode_header(hview)
            if isinstance(h, str):  # resync: slide to the next magic
                if not in_garbage:
                    self._malformed(f"{h}; resynchronising")
                in_garbage = True
                at = hbuf.find(MAGIC, 1)
                keep = HEADER_SIZE - at if at > 0 else len(MAGIC) - 1
                stats.skipped_bytes += HEADER_SIZE - keep
                hbuf[:keep] = hbuf[HEADER_SIZE - keep:]
                have = keep
                continue
            in_garbage, have = False, 0
            if h.flags & (END_SERIES | END_STREAM):
                if h.flags & END_SERIES:
                    ring.mark_end(h.series_id)
                if h.flags & END_STREAM:
                    return True
                continue
            self._frame(conn, h, ring, stop, scratch)
        return False

    def _frame(self, conn: socket.socket, h: WireHeader, ring: FrameRing, stop: threading.Event,
               scratch: memoryview) -> None:
        stats = self.stats
        if h.shape != ring.frame_shape or h.dtype != ring.dtype:
            self._malformed(f"frame {h.frame_id} is {h.shape} {h.dtype}, ring slots hold {ring.frame_shape} "
                            f"{ring.dtype}; discarded")
            if h.nbytes > self.max_payload:
                raise _Disconnected(f"payload of {h.nbytes} bytes exceeds max_payload")
            self._drain(conn, h.nbytes, stop, scratch)
            return
        slot = ring.acquire_write(stop=stop)
        if slot is None and stop.is_set():  # a shutdown, not a drop
            return
        stats.sent += 1
        if slot is None:
            ring.drop(h.frame_id)
            stats.dropped += 1
            self._drain(conn, h.nbytes, stop, scratch)
            return
        try:
            if self._fill(conn, ring.slot_buffer(slot), 0, stop) < h.nbytes:
                ring.abort(slot)
                return
        except BaseException:
            ring.abort(slot)
            raise
        ring.commit(slot, h.frame_id, series_id=h.series_id, position_px=h.position_px,
                    position_m=h.position_m, t_detector=h.t_detector)
        stats.received += 1

    def _malformed(self, what: str) -> None:
        self.stats.malformed += 1
        n = self.stats.malformed
        if n & (n - 1) == 0:  # 1st, 2nd, 4th, 8th…: visible without flooding the log at kHz
            log.warning("tcp source: %s (malformed #%d)", what, n)

    @staticmethod
    def _fill(conn: socket.socket, view: memoryview, have: int, stop: threading.Event) -> int:
        """recv_into view[have:] until full or stop; returns bytes held. Raises _Disconnected at EOF."""
        end = len(view)
        while have < end:
            try:
                got = conn.recv_into(view[have:], end - have)
            except TimeoutError:
                if stop.is_set():
                    return have
                continue
            if got == 0:
                raise _Disconnected()
            have += got
        return have

    def _drain(self, conn: socket.socket, n: int, stop: threading.Event, scratch: memoryview) -> None:
        while n > 0 and not stop.is_set():
            got = self._fill(conn, scratch[:min(n, len(scratch))], 0, stop)
            n -= got

    def close(self) -> None:
        self._listener.close()


class TcpSender:
    """Sends frames in the TcpSource wire format (simulators, tests). Also a RingWriter: any Source can
    run into it, e.g. ReplaySource(path, rate_hz=1000).run(TcpSender(host, port), stop) replays a scan."""

    policy = "backpressure"  # TCP flow control throttles the sender
    timeout_s = None

    def __init__(self, host: str = "127.0.0.1", port: int = 0, frame_shape: tuple[int, int] | None = None,
                 dtype: Any = None, connect_timeout: float = 10.0):
        self.sock = socket.create_connection((host, port), timeout=connect_timeout)
        self.sock.settimeout(None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle delay on the tail segment
        self._hdr = bytearray(HEADER_SIZE)
        self.frame_shape = tuple(frame_shape) if frame_shape else None
        self.dtype = np.dtype(dtype) if dtype is not None else None
        self._slot: np.ndarray | None = None
        self.sent = 0

    def send(self, frame: np.ndarray, frame_id: int, series_id: int = 0, position_px: Any = (math.nan, math.nan),
             position_m: Any = (math.nan, math.nan), t_detector: float = math.nan) -> None:
        """Send one (H, W) frame: header and payload in one gathered write, no copy of the pixels."""
        frame = np.ascontiguousarray(frame)
        if frame.dtype.byteorder == ">":
            frame = frame.astype(frame.dtype.newbyteorder("<"))
        encode_header(self._hdr, frame_id, shape=frame.shape, dtype=frame.dtype, nbytes=frame.nbytes,
                      series_id=series_id, position_px=position_px, position_m=position_m, t_detector=t_detector)
        _sendmsg_all(self.sock, [self._hdr, memoryview(frame).cast("B")])
        self.sent += 1

    def end_series(self, series_id: int = 0) -> None:
        encode_header(self._hdr, -1, flags=END_SERIES, series_id=series_id)
        self.sock.sendall(self._hdr)

    def send_bytes(self, data: bytes) -> None:
        """Raw bytes onto the stream (tests: garbage injection)."""
        self.sock.sendall(data)

    def close(self, end_stream: bool = True) -> None:
        if self.sock.fileno() < 0:
            return
        if end_stream:
            encode_header(self._hdr, -1, flags=END_STREAM)
            try:
                self.sock.sendall(self._hdr)
            except OSError:
                pass
        self.sock.close()

    def __enter__(self) -> TcpSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- RingWriter: one local scratch slot, sent on commit ----------------------------------------------
    def acquire_write(self, timeout: float | None = None, stop: threading.Event | None = None) -> int:
        if self.frame_shape is None or self.dtype is None:
            raise ValueError("TcpSender used as a RingWriter needs frame_shape and dtype")
        if self._slot is None:
            self._slot = np.empty(self.frame_shape, self.dtype)
        return 0

    def slot_view(self, slot: int) -> np.ndarray:
        assert self._slot is not None
        return self._slot

    def slot_buffer(self, slot: int) -> memoryview:
        return memoryview(self.slot_view(slot)).cast("B")

    def commit(self, slot: int, frame_id: int, series_id: int = 0, position_px: Any = (math.nan, math.nan),
               position_m: Any = (math.nan, math.nan), t_detector: float = math.nan, **_: Any) -> None:
        self.send(self.slot_view(slot), frame_id, series_id, position_px, position_m, t_detector)

    def abort(self, slot: int) -> None:
        pass

    def drop(self, frame_id: int) -> None:
        pass

    def mark_end(self, series_id: int = 0) -> None:
        self.end_series(series_id)

    def close_input(self) -> None:
        self.close(end_stream=True)


def _sendmsg_all(sock: socket.socket, buffers: list[Any]) -> None:
    views = [memoryview(b).cast("B") for b in buffers]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]

