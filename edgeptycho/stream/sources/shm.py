"""Cross-process frames: a producer process writes into the ring's shared-memory slab, slots granted as credits.

Protocol over one Unix stream socket (the small queue beside the shared payload):
  1. ShmSource → producer: hello = u32 length + JSON {version, slab and stamps segment names (the ring must
     be allocated by edgeptycho.hw.memory.SharedMemoryAllocator), n_slots, frame_shape, dtype, policy,
     timeout_s}.
  2. ShmSource → producer: credits, little-endian int32 slot indices the producer may fill (every free slot
     of the ring is granted; released slots are granted again as the consumer returns them).
  3. producer → ShmSource: one 96-byte wire header per event (sources.base): a frame in `slot` (the producer
     wrote the payload, then stamps[slot] = frame_id, then sent the record), DROPPED (no credit: free-running
     policy), END_SERIES, END_STREAM. The socket syscalls order the shared-memory writes before the record.
The ring's consumer sees an ordinary FrameRing; ring.verify(batch) checks the shared stamps to catch a
producer that wrote a slot it no longer held.
"""

from __future__ import annotations

import collections
import json
import logging
import multiprocessing
import os
import select
import socket
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ...hw.memory import SharedMemoryAllocator
from ..ring import FrameRing, RingClosed
from .base import (
    DROPPED,
    END_SERIES,
    END_STREAM,
    HEADER_SIZE,
    Source,
    SourceStats,
    WireHeader,
    decode_header,
    encode_header,
)

log = logging.getLogger(__name__)
_LEN = struct.Struct("<I")
_PROTOCOL = 1


class ShmSource(Source):
    """Receives frames that a producer process writes straight into the ring's shared slab.

    `producer`: a Source (e.g. ReplaySource, ArraySource) run in a spawned child process that writes through
    a ShmProducer; or None to wait for an external process calling ShmProducer(address). One producer
    connection per run(); its disconnect ends the stream.
    """

    name = "shm"

    def __init__(self, producer: Source | None = None, address: str | Path | None = None,
                 connect_timeout: float = 60.0):
        super().__init__()
        self.producer = producer
        self._tmpdir = None if address else tempfile.mkdtemp(prefix="edgeptycho-shm-")
        self.address = str(address or Path(self._tmpdir) / "ring.sock")  # type: ignore[arg-type]
        self.connect_timeout = connect_timeout
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.address)
        self._listener.listen(1)
        # Consumer releases poke this pipe so the serve loop re-grants credits at once. It lives as long as
        # the source: a release racing the end of run() must never write into a closed (or reused) fd.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self.process: multiprocessing.process.BaseProcess | None = None

    def frame_spec(self) -> tuple[tuple[int, int], np.dtype] | None:
        return self.producer.frame_spec() if self.producer is not None else None

    def run(self, ring: FrameRing, stop: threading.Event) -> SourceStats:  # type: ignore[override]
        if not isinstance(ring.allocator, SharedMemoryAllocator) or ring.segment_names is None:
            raise ValueError("ShmSource needs a FrameRing allocated with edgeptycho.hw.memory.SharedMemoryAllocator()")
        hello = json.dumps({
            "version": _PROTOCOL, "slab": ring.segment_names[0], "stamps": ring.segment_names[1],
            "n_slots": ring.n_slots, "frame_shape": list(ring.frame_shape), "dtype": ring.dtype.str,
            "policy": ring.policy, "timeout_s": ring.timeout_s,
        }).encode()
        if self.producer is not None:
            ctx = multiprocessing.get_context("spawn")  # fork would copy this process's threads and locks
            self.process = ctx.Process(target=_producer_main, args=(self.address, self.producer),
                                       name="edgeptycho-shm-producer", daemon=True)
            self.process.start()
        granted = np.zeros(ring.n_slots, bool)
        conn = None
        try:
            conn = self._accept(stop)
            if conn is None:
                return self.stats
            conn.sendall(_LEN.pack(len(hello)) + hello)
            ring.set_release_hook(lambda n: _poke(self._wake_w))
            self._serve(conn, ring, stop, self._wake_r, granted)
        except RingClosed:
            log.info("shm source: ring closed by its owner")
        finally:
            ring.set_release_hook(None)
            for slot in np.flatnonzero(granted).tolist():  # credits the producer never used
                ring.abort(slot)
            if conn is not None:
                conn.close()
            ring.close_input()
            self._reap()
        return self.stats

    def _accept(self, stop: threading.Event) -> socket.socket | None:
        deadline = time.monotonic() + self.connect_timeout
        self._listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                conn = None
            if conn is not None:
                conn.settimeout(None)
                return conn
            if self.process is not None and not self.process.is_alive():
                raise RuntimeError(f"shm producer process exited ({self.process.exitcode}) before connecting")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no shm producer connected to {self.address} in {self.connect_timeout} s")
        return None

    def _serve(self, conn: socket.socket, ring: FrameRing, stop: threading.Event, wake_r: int,
               granted: np.ndarray) -> None:
        stats, buf = self.stats, bytearray(HEADER_SIZE * 256)
        view, have = memoryview(buf), 0
        credits = np.empty(ring.n_slots, "<i4")
        producer_done = False  # it closed its end: grant nothing more, but read every record it sent first
        while not stop.is_set():
            n = 0
            while not producer_done and (slot := ring.try_acquire()) is not None:  # grant every free slot
                credits[n] = slot
                granted[slot] = True
                n += 1
            if n:
                try:
                    conn.sendall(memoryview(credits[:n]).cast("B"))
                except (BrokenPipeError, ConnectionResetError):
                    # A producer closes right after its last record (END_STREAM): those records are still
                    # in our receive buffer, and dropping them here lost frames from the accounting.
                    producer_done = True
                    for slot in credits[:n].tolist():
                        granted[slot] = False
                        ring.abort(slot)
            readable, _, _ = select.select([conn, wake_r], [], [], 0.1)
            if wake_r in readable:
                os.read(wake_r, 4096)
            if conn not in readable:
                continue
            got = conn.recv_into(view[have:])
            if got == 0:
                log.warning("shm producer disconnected without END_STREAM")
                return
            have += got
            done = have - have % HEADER_SIZE
            for off in range(0, done, HEADER_SIZE):
                hdr = decode_header(view[off:off + HEADER_SIZE])
                if isinstance(hdr, str):
                    stats.malformed += 1
                    log.warning("shm producer sent a bad record: %s", hdr)
                elif self._handle(hdr, ring, granted):
                    return
            buf[:have - done] = buf[done:have]
            have -= done

    def _handle(self, h: WireHeader, ring: FrameRing, granted: np.ndarray) -> bool:
        """Apply one record; True at END_STREAM."""
        stats = self.stats
        if h.flags & DROPPED:
            ring.drop(h.frame_id)
            stats.sent += 1
            stats.dropped += 1
        elif h.flags & (END_SERIES | END_STREAM):
            if h.flags & END_SERIES:
                ring.mark_end(h.series_id)
            return bool(h.flags & END_STREAM)
        elif not (0 <= h.slot < ring.n_slots and granted[h.slot]):
            stats.malformed += 1
            log.warning("shm producer committed slot %d it holds no credit for", h.slot)
        elif h.shape != ring.frame_shape or h.dtype != ring.dtype:
            stats.malformed += 1
            granted[h.slot] = False
            ring.abort(h.slot)
        else:
            granted[h.slot] = False
            ring.commit(h.slot, h.frame_id, series_id=h.series_id, position_px=h.position_px,
                        position_m=h.position_m, t_detector=h.t_detector)
            stats.sent += 1
            stats.received += 1
        return False

    def _reap(self) -> None:
        if self.process is not None:
            self.process.join(timeout=5.0)
            if self.process.is_alive():
                self.process.terminate()
                self.process.join(timeout=5.0)

    def close(self) -> None:
        """Release the listening socket and wake pipe (after run() has returned)."""
        if self._listener.fileno() < 0:
            return
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self._tmpdir:
            Path(self.address).unlink(missing_ok=True)
            os.rmdir(self._tmpdir)
            self._tmpdir = None


def _poke(fd: int) -> None:
    try:
        os.write(fd, b"\0")
    except BlockingIOError:  # the pipe already holds a wake-up
        pass


def _producer_main(address: str, source: Source) -> None:
    with ShmProducer(address) as producer:
        source.run(producer, threading.Event())


class ShmProducer:
    """The producer end, in another process: the RingWriter interface over the shared slab (any Source runs
    into it). acquire_write() takes a credit; commit() sends the record; the policy is the ring's."""

    def __init__(self, address: str | Path, timeout: float = 30.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(address))
        n = _LEN.unpack(_recv_exact(self.sock, _LEN.size))[0]
        hello = json.loads(_recv_exact(self.sock, n))
        self.sock.settimeout(None)
        if hello.get("version") != _PROTOCOL:
            raise ValueError(f"shm ring protocol {hello.get('version')} is not {_PROTOCOL}")
        self.n_slots, self.frame_shape = int(hello["n_slots"]), tuple(hello["frame_shape"])
        self.dtype = np.dtype(hello["dtype"])
        self.policy, self.timeout_s = hello["policy"], hello["timeout_s"]
        self._shm_slab, self.slab = SharedMemoryAllocator.attach(hello["slab"], (self.n_slots, *self.frame_shape),
                                                                 self.dtype)
        self._shm_stamps, self.stamps = SharedMemoryAllocator.attach(hello["stamps"], (self.n_slots,), np.int64)
        self._credits: collections.deque[int] = collections.deque()
        self._cbuf = bytearray(4 * (self.n_slots + 1))
        self._pending = 0
        self._rec = bytearray(HEADER_SIZE)
        self._closed = False
        self.sent = self.dropped = 0

    def acquire_write(self, timeout: float | None = None, stop: threading.Event | None = None) -> int | None:
        if self._closed:
            raise RingClosed("producer closed")
        if not self._credits:
            self._read_credits(0.0)
        if not self._credits and self.policy == "backpressure":
            wait = self.timeout_s if timeout is None else timeout
            deadline = None if wait is None else time.monotonic() + wait
            while not self._credits and not (stop is not None and stop.is_set()):
                left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
                if left <= 0:
                    break
                self._read_credits(left)
        if not self._credits:
            return None
        slot = self._credits.popleft()
        self.stamps[slot] = -1
        return slot

    def slot_view(self, slot: int) -> np.ndarray:
        return self.slab[slot]

    def slot_buffer(self, slot: int) -> memoryview:
        return memoryview(self.slab[slot]).cast("B")

    def commit(self, slot: int, frame_id: int, series_id: int = 0, position_px: Any = (np.nan, np.nan),
               position_m: Any = (np.nan, np.nan), t_detector: float = np.nan, **_: Any) -> None:
        self.stamps[slot] = frame_id
        self._send(frame_id, 0, slot=slot, series_id=series_id, shape=self.frame_shape, dtype=self.dtype,
                   nbytes=self.slab[slot].nbytes, position_px=position_px, position_m=position_m,
                   t_detector=t_detector)
        self.sent += 1

    def abort(self, slot: int) -> None:
        self._credits.appendleft(slot)

    def drop(self, frame_id: int) -> None:
        self._send(frame_id, DROPPED)
        self.sent += 1
        self.dropped += 1

    def mark_end(self, series_id: int = 0) -> None:
        self._send(-1, END_SERIES, series_id=series_id)

    def close_input(self) -> None:
        if not self._closed:
            try:
                self._send(-1, END_STREAM)
            except RingClosed:  # the consumer went away first
                pass
            self._closed = True

    def close(self) -> None:
        self.close_input()
        self.sock.close()
        del self.slab, self.stamps  # views first, then the mappings
        for shm in (self._shm_slab, self._shm_stamps):
            try:
                shm.close()
            except BufferError:  # a Source still holds a slot view; the mapping goes with it
                pass

    def __enter__(self) -> ShmProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, frame_id: int, flags: int, **fields: Any) -> None:
        encode_header(self._rec, frame_id, flags=flags, **fields)
        try:
            self.sock.sendall(self._rec)
        except OSError as exc:
            self._closed = True
            raise RingClosed(f"shm consumer went away: {exc}") from exc

    def _read_credits(self, timeout: float) -> None:
        # The socket stays blocking (records are sent with sendall); only this read is non-blocking.
        if timeout > 0 and not select.select([self.sock], [], [], timeout)[0]:
            return
        try:
            got = self.sock.recv_into(memoryview(self._cbuf)[self._pending:], 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        if got == 0:
            self._closed = True
            raise RingClosed("shm consumer closed the connection")
        total = self._pending + got
        whole = total - total % 4
        self._credits.extend(np.frombuffer(self._cbuf, "<i4", whole // 4).tolist())
        self._cbuf[:total - whole] = self._cbuf[whole:total]
        self._pending = total - whole


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("shm source closed the connection during the handshake")
        out += chunk
    return bytes(out)
