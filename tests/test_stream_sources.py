"""Sources: replay (memory, CXI file, pacing), TCP with garbage, shared memory from a subprocess, RDMA logic."""

from __future__ import annotations

import threading
import time

import h5py
import numpy as np
import pytest

from edgeptycho.hw.memory import SharedMemoryAllocator
from edgeptycho.physics.types import ScanData
from edgeptycho.stream.ring import FrameRing
from edgeptycho.stream.sources import SourceUnavailable, make_source, source_class
from edgeptycho.stream.sources.base import END_STREAM, HEADER_SIZE, encode_header
from edgeptycho.stream.sources.rdma import RdmaSource
from edgeptycho.stream.sources.replay import ArraySource, ReplaySource
from edgeptycho.stream.sources.shm import ShmSource
from edgeptycho.stream.sources.tcp import TcpSender, TcpSource


def _frames(n: int, shape=(16, 16), dtype=np.uint16, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, (n, *shape)).astype(dtype)


def _drain(ring: FrameRing, timeout: float = 10.0, check=None) -> tuple[list[int], np.ndarray, list[int]]:
    """Consume until the ring closes: (frame ids, meta records, series ends); `check(slot, meta)` per frame."""
    ids, metas, ends = [], [], []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = ring.take(8, timeout=1.0)
        for s, m in zip(batch.slots.tolist(), batch.meta, strict=True):
            if check:
                check(s, m)
        ids += batch.frame_ids.tolist()
        metas.append(batch.meta)
        ring.release(batch.slots)
        if batch.end_series is not None:
            ends.append(batch.end_series)
        if batch.closed:
            return ids, np.concatenate(metas), ends
    raise AssertionError("ring never closed")


def _bit_exact(ring: FrameRing, frames: np.ndarray):
    def check(slot, meta):
        assert np.array_equal(ring.slab[slot], frames[meta["frame_id"]])
    return check


# --- replay ------------------------------------------------------------------------------------------------
def test_array_source_carries_positions_and_marks_the_end():
    frames = _frames(40)
    pos = np.random.default_rng(1).uniform(0, 100, (40, 2))
    ring = FrameRing(8, (16, 16), np.uint16)
    src = ArraySource(frames, positions_px=pos, positions_m=pos * 1e-8, series_id=3)
    src.start(ring)
    ids, meta, ends = _drain(ring, check=_bit_exact(ring, frames))
    assert ids == list(range(40)) and ends == [3]
    np.testing.assert_array_equal(meta["position_px"], pos)
    np.testing.assert_allclose(meta["position_m"], pos * 1e-8)
    assert (meta["series_id"] == 3).all() and np.isnan(meta["t_detector"]).all()
    assert src.stats.sent == src.stats.received == 40


def test_array_source_refuses_frames_that_do_not_fit():
    with pytest.raises(ValueError, match="positions_px"):
        ArraySource(_frames(4), positions_px=np.zeros((3, 2)))
    ring = FrameRing(4, (8, 8), np.uint16)
    with pytest.raises(ValueError, match="do not fit"):
        ArraySource(_frames(4)).run(ring, threading.Event())
    ring = FrameRing(4, (16, 16), np.uint8)
    with pytest.raises(ValueError, match="losslessly"):
        ArraySource(_frames(4)).run(ring, threading.Event())


def _write_cxi(path, frames, positions_m):
    scan = ScanData(frames=frames.astype(np.float32), positions_m=positions_m, energy_J=1.6e-15,
                    distance_m=2.0, detector_pixel_m=75e-6)
    from edgeptycho.io.cxi import write_scan

    write_scan(path, scan)
    return scan


def test_replay_reads_a_cxi_file_lazily_with_its_positions(tmp_path):
    frames = _frames(37, dtype=np.float32)
    pos_m = np.random.default_rng(2).uniform(0, 1e-6, (37, 2))
    scan = _write_cxi(tmp_path / "scan.cxi", frames, pos_m)
    src = ReplaySource(tmp_path / "scan.cxi", first_id=100, chunk_frames=5)
    assert src.frame_spec() == ((16, 16), np.dtype(np.float32)) and src.n_frames == 37
    ring = FrameRing(6, (16, 16), np.float32)
    src.start(ring)

    def check(slot, meta):
        assert np.array_equal(ring.slab[slot], frames[meta["frame_id"] - 100])

    ids, meta, ends = _drain(ring, check=check)
    assert ids == list(range(100, 137)) and ends == [0]
    np.testing.assert_allclose(meta["position_m"], pos_m)
    np.testing.assert_allclose(meta["position_px"], pos_m / scan.object_pixel_m)


def test_replay_of_a_bare_hdf5_file_has_frames_but_no_positions(tmp_path):
    frames = _frames(10, dtype=np.uint16)
    with h5py.File(tmp_path / "bare.h5", "w") as f:
        f["entry_1/data_1/data"] = frames
    ring = FrameRing(4, (16, 16), np.uint32)  # uint16 widened losslessly into uint32 slots
    src = ReplaySource(tmp_path / "bare.h5", start_frame=2, stop_frame=8)
    src.start(ring)
    ids, meta, _ = _drain(ring, check=lambda s, m: np.testing.assert_array_equal(ring.slab[s],
                                                                                   frames[m["frame_id"]]))
    assert ids == list(range(2, 8)) and np.isnan(meta["position_px"]).all()


def test_replay_pacing_emits_about_rate_times_window():
    ring = FrameRing(64, (4, 4), np.uint8, policy="free-running")
    src = ArraySource(np.zeros((10_000, 4, 4), np.uint8), rate_hz=200.0)
    thread, stop = src.start(ring)
    time.sleep(0.5)
    stop.set()
    thread.join(5)
    # ~100 due in 0.5 s; generous bounds: this is a shared 2-core machine
    assert 40 <= src.stats.sent <= 160
    meta = ring.take(200, timeout=0).meta
    gaps = np.diff(meta["t_detector"])
    np.testing.assert_allclose(gaps, 1 / 200.0, atol=1e-6)  # detector stamps are the absolute deadlines


# --- tcp ---------------------------------------------------------------------------------------------------
def test_tcp_round_trip_is_bit_exact_through_garbage():
    frames = _frames(30, shape=(32, 24), dtype=np.uint16)
    src = TcpSource()
    ring = FrameRing(8, (32, 24), np.uint16)
    thread, _ = src.start(ring)
    with TcpSender(*src.address) as tx:
        for i, f in enumerate(frames):
            tx.send(f, i, position_px=(i, 2 * i), t_detector=float(i))
            if i == 5:
                tx.send_bytes(b"\x00garbage!" * 50)  # noise between frames
            if i == 10:
                bad = bytearray(HEADER_SIZE)
                encode_header(bad, 999, shape=(32, 24), dtype=np.uint16, nbytes=32 * 24 * 2)
                bad[40] ^= 0xFF  # valid magic, broken checksum
                tx.send_bytes(bytes(bad))
            if i == 15:
                tx.send(np.ones((8, 8), np.uint16), 500)  # a valid frame of the wrong shape: drained
        tx.end_series(4)
    ids, meta, ends = _drain(ring, check=_bit_exact(ring, frames))
    thread.join(5)
    assert ids == list(range(30)) and ends == [4]
    np.testing.assert_array_equal(meta["position_px"][:, 1], 2 * np.arange(30))
    np.testing.assert_array_equal(meta["t_detector"], np.arange(30.0))
    assert src.stats.received == 30 and src.stats.malformed == 3 and src.stats.skipped_bytes > 0
    src.close()


def test_tcp_survives_a_sender_that_dies_mid_frame_and_serves_the_next():
    frames = _frames(6, shape=(16, 16))
    src = TcpSource()
    ring = FrameRing(8, (16, 16), np.uint16)
    thread, _ = src.start(ring)
    tx = TcpSender(*src.address)
    tx.send(frames[0], 0)
    hdr = bytearray(HEADER_SIZE)
    encode_header(hdr, 1, shape=(16, 16), dtype=np.uint16, nbytes=512)
    tx.send_bytes(bytes(hdr) + frames[1].tobytes()[:100])  # truncated payload, then the connection drops
    tx.close(end_stream=False)
    with TcpSender(*src.address) as tx2:
        for i in range(2, 6):
            tx2.send(frames[i], i)
    ids, _, _ = _drain(ring, check=_bit_exact(ring, frames))
    thread.join(5)
    assert ids == [0, 2, 3, 4, 5] and src.connections == 2
    assert ring.stats()["in_flight"] == 0 and ring.stats()["occupancy"] == 0  # the half-written slot came back
    src.close()


def test_tcp_free_running_accounting_and_replay_through_a_sender():
    n = 400
    frames = _frames(n, shape=(16, 16))
    src = TcpSource()
    ring = FrameRing(3, (16, 16), np.uint16, policy="free-running")
    thread, _ = src.start(ring)
    tx = TcpSender(*src.address, frame_shape=(16, 16), dtype=np.uint16)
    sender = threading.Thread(target=ArraySource(frames).run, args=(tx, threading.Event()))  # any Source → TCP
    sender.start()
    seen: list[int] = []
    while True:
        batch = ring.take(1, timeout=5)
        seen += batch.frame_ids.tolist()
        time.sleep(5e-4)
        ring.release(batch.slots)
        if batch.closed:
            break
    sender.join(5)
    thread.join(5)
    st = ring.stats()
    assert tx.sent == n == st["received"] + st["dropped"] == src.stats.sent
    assert st["dropped"] > 0 and ring.lost_ids().tolist() == sorted(set(range(n)) - set(seen))
    src.close()


# --- shared memory -----------------------------------------------------------------------------------------
def test_shm_producer_in_a_subprocess_writes_frames_the_parent_reads_bit_exactly():
    frames = _frames(200, shape=(64, 48), dtype=np.uint16)
    pos = np.arange(400.0).reshape(200, 2)
    alloc = SharedMemoryAllocator()
    ring = FrameRing(8, (64, 48), np.uint16, allocator=alloc)
    src = ShmSource(ArraySource(frames, positions_px=pos, series_id=9))
    try:
        thread, _ = src.start(ring)
        ids, meta, ends = _drain(ring, timeout=60, check=_bit_exact(ring, frames))
        thread.join(10)
        assert ids == list(range(200)) and ends == [9]
        np.testing.assert_array_equal(meta["position_px"], pos)
        assert src.stats.received == 200 and src.stats.malformed == 0
        assert src.process is not None and src.process.exitcode == 0
    finally:
        src.close()
        alloc.close()


def test_shm_free_running_producer_reports_its_drops_exactly():
    n = 300
    frames = _frames(n, shape=(16, 16))
    alloc = SharedMemoryAllocator()
    ring = FrameRing(2, (16, 16), np.uint16, allocator=alloc, policy="free-running")
    src = ShmSource(ArraySource(frames))
    try:
        thread, _ = src.start(ring)
        seen: list[int] = []
        while True:
            batch = ring.take(1, timeout=30)
            assert ring.verify(batch).all()
            seen += batch.frame_ids.tolist()
            time.sleep(5e-4)
            ring.release(batch.slots)
            if batch.closed:
                break
        thread.join(10)
        st = ring.stats()
        assert st["received"] + st["dropped"] == n == src.stats.sent and st["dropped"] > 0
        assert ring.lost_ids().tolist() == sorted(set(range(n)) - set(seen))
    finally:
        src.close()
        alloc.close()


def test_shm_stop_ends_the_producer_process():
    alloc = SharedMemoryAllocator()
    ring = FrameRing(4, (8, 8), np.uint16, allocator=alloc)
    src = ShmSource(ArraySource(np.zeros((100_000, 8, 8), np.uint16), rate_hz=100.0))
    try:
        thread, stop = src.start(ring)
        while ring.received < 3:
            ring.release(ring.take(4, timeout=30).slots)
        stop.set()
        thread.join(10)
        assert not thread.is_alive() and ring.closed
        assert src.process is not None and src.process.exitcode == 0  # ended cleanly, not killed
    finally:
        src.close()
        alloc.close()


def test_shm_refuses_a_ring_outside_shared_memory():
    ring = FrameRing(2, (4, 4), np.uint8)
    src = ShmSource()
    try:
        with pytest.raises(ValueError, match="SharedMemoryAllocator"):
            src.run(ring, threading.Event())
    finally:
        src.close()


# --- rdma --------------------------------------------------------------------------------------------------
def test_rdma_probe_says_why_it_is_unavailable():
    try:
        RdmaSource.probe()
    except SourceUnavailable as exc:
        assert exc.reason and "TcpSource" in exc.fix
    else:
        pytest.skip("a verbs device exists here")
    with pytest.raises(SourceUnavailable):
        RdmaSource("127.0.0.1")


class FakePort:
    """Stands in for the verbs QP: receives complete in posting order, like an RC receive queue."""

    def __init__(self) -> None:
        self.posted: list[tuple[int, np.ndarray, np.ndarray]] = []
        self.done: list[tuple[int, bool, int]] = []
        self.lock = threading.Lock()
        self.started = self.closed = False

    def post_recv(self, wr_id, header, payload):
        with self.lock:
            self.posted.append((wr_id, header, payload))

    def start(self):
        self.started = True

    def poll(self, max_n):
        with self.lock:
            out, self.done = self.done[:max_n], self.done[max_n:]
        return out

    def close(self):
        self.closed = True

    def send(self, header: bytes, payload: bytes = b"") -> bool:
        """The remote SEND: scatter into the oldest posted receive; False = RNR (none posted)."""
        with self.lock:
            if not self.posted:
                return False
            wr_id, hdr, body = self.posted.pop(0)
            hdr[:] = np.frombuffer(header, np.uint8)
            body.reshape(-1).view(np.uint8)[:len(payload)] = np.frombuffer(payload, np.uint8)
            self.done.append((wr_id, True, len(header) + len(payload)))
            return True


def _rdma_frame(frame_id: int, frame: np.ndarray, flags: int = 0) -> bytes:
    hdr = bytearray(HEADER_SIZE)
    if flags:
        encode_header(hdr, frame_id, flags=flags)
    else:
        encode_header(hdr, frame_id, shape=frame.shape, dtype=frame.dtype, nbytes=frame.nbytes)
    return bytes(hdr)


@pytest.mark.parametrize("policy", ["backpressure", "free-running"])
def test_rdma_slot_logic_with_a_fake_verbs_port(policy):
    frames = _frames(60, shape=(8, 8))
    ring = FrameRing(4, (8, 8), np.uint16, policy=policy)
    port = FakePort()
    src = RdmaSource("127.0.0.1", port_factory=lambda r, h, s: port)
    thread, _ = src.start(ring)
    received: list[int] = []

    def consume():
        while True:
            batch = ring.take(2, timeout=2)
            for s, m in zip(batch.slots.tolist(), batch.meta, strict=True):
                assert np.array_equal(ring.slab[s], frames[m["frame_id"]])
            received.extend(batch.frame_ids.tolist())
            time.sleep(1e-3)
            ring.release(batch.slots)
            if batch.closed:
                return

    consumer = threading.Thread(target=consume)
    consumer.start()
    for i, f in enumerate(frames):
        while not port.send(_rdma_frame(i, f), f.tobytes()):  # RNR: the sender retries
            time.sleep(1e-4)
    while not port.send(_rdma_frame(-1, frames[0], END_STREAM)):
        time.sleep(1e-4)
    consumer.join(10)
    thread.join(10)
    st = ring.stats()
    assert port.started and port.closed
    assert st["received"] + st["dropped"] == 60 == src.stats.sent
    if policy == "backpressure":
        assert received == list(range(60)) and st["dropped"] == 0
    else:
        assert st["dropped"] > 0 and ring.lost_ids().tolist() == sorted(set(range(60)) - set(received))
    assert st["occupancy"] == 0 and st["in_flight"] == 0


def test_source_registry():
    assert source_class("tcp") is TcpSource
    src = make_source("array", frames=np.zeros((2, 4, 4)))
    assert isinstance(src, ArraySource)
    with pytest.raises(ValueError, match="known: array"):
        make_source("carrier-pigeon")
