"""FrameRing: leases, lap detection, overload policies with exact accounting, zero-copy views, batching."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edgeptycho.config import ConfigError, from_mapping
from edgeptycho.hw.base import HostAllocator
from edgeptycho.stream.ring import FrameRing, RingClosed, RingConfig
from edgeptycho.stream.sources.replay import ArraySource


def _put(ring: FrameRing, frame_id: int) -> int | None:
    slot = ring.acquire_write(timeout=0)
    if slot is None:
        ring.drop(frame_id)
        return None
    ring.slot_view(slot)[...] = frame_id
    ring.commit(slot, frame_id, position_px=(frame_id, -frame_id))
    return slot


def test_leased_and_unreleased_slots_are_never_handed_out():
    rng = np.random.default_rng(1)
    ring = FrameRing(5, (2, 2), np.int64, policy="free-running")
    leased: set[int] = set()
    queued: set[int] = set()
    next_id = 0
    for _ in range(3000):
        op = rng.integers(3)
        if op == 0:
            slot = _put(ring, next_id)
            next_id += 1
            if slot is not None:
                assert slot not in leased and slot not in queued
                queued.add(slot)
        elif op == 1:
            batch = ring.take(int(rng.integers(1, 4)), timeout=0)
            for s, fid in zip(batch.slots.tolist(), batch.frame_ids.tolist(), strict=True):
                assert s in queued and (ring.slab[s] == fid).all()
                queued.discard(s)
                leased.add(s)
        elif leased:
            s = int(rng.choice(sorted(leased)))
            ring.release(s)
            leased.discard(s)
        st = ring.stats()
        assert st["in_flight"] == len(leased) and st["queued"] == len(queued)
    assert ring.received + ring.dropped == next_id


def test_misuse_is_refused():
    ring = FrameRing(2, (2, 2), np.uint16)
    with pytest.raises(ValueError, match="not leased"):
        ring.release(0)
    with pytest.raises(ValueError, match="not acquired"):
        ring.commit(1, 0)
    ring.close_input()
    with pytest.raises(RingClosed):
        ring.acquire_write()
    with pytest.raises(ValueError, match="policy"):
        FrameRing(2, (2, 2), np.uint16, policy="drop-everything")


def test_ring_config_from_yaml_names_the_bad_key():
    cfg = from_mapping(RingConfig, {"slots": 64, "policy": "free-running", "timeout_s": None})
    assert (cfg.slots, cfg.policy, cfg.timeout_s) == (64, "free-running", None)
    with pytest.raises(ConfigError, match="policy"):
        from_mapping(RingConfig, {"policy": "sometimes"}, "ring")
    ring = FrameRing.from_config(cfg, (4, 4), np.float32)
    assert ring.slab.shape == (64, 4, 4) and ring.policy == "free-running"


def test_verify_detects_a_writer_that_lapped_a_leased_slot():
    ring = FrameRing(4, (3, 3), np.float32)
    for i in range(3):
        _put(ring, i)
    batch = ring.take(3)
    assert ring.verify(batch).all()
    ring.stamps[batch.slots[1]] = 99  # a remote producer stamping a slot it no longer held
    ok = ring.verify(batch)
    assert ok.tolist() == [True, False, True]
    assert ring.stats()["lapped"] == 1


def test_peek_latest_copies_the_newest_frame_without_a_lease():
    ring = FrameRing(3, (4, 4), np.int32)
    out = np.empty((4, 4), np.int32)
    assert ring.peek_latest(out) is None
    for i in range(2):
        _put(ring, i)
    meta = ring.peek_latest(out)
    assert meta["frame_id"] == 1 and (out == 1).all()
    assert ring.stats()["in_flight"] == 0


def test_peek_latest_never_returns_a_torn_frame():
    ring = FrameRing(2, (256, 256), np.int64, policy="latest")
    stop = threading.Event()

    def produce():
        i = 0
        while not stop.is_set():
            slot = ring.acquire_write()
            ring.slot_view(slot)[...] = i
            ring.commit(slot, i)
            i += 1

    t = threading.Thread(target=produce)
    t.start()
    out = np.empty((256, 256), np.int64)
    good = 0
    try:
        while ring.received == 0:
            time.sleep(1e-3)
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            meta = ring.peek_latest(out)
            if meta is not None:
                good += 1
                assert (out == meta["frame_id"]).all()
    finally:
        stop.set()
        t.join()
    assert good + ring.stats()["lapped"] >= 1


def test_backpressure_blocks_the_producer_until_a_slot_is_released():
    ring = FrameRing(2, (2, 2), np.uint8, policy="backpressure", timeout_s=10.0)
    _put(ring, 0)
    _put(ring, 1)
    assert ring.acquire_write(timeout=0.05) is None  # full: times out
    got: list[int | None] = []
    t = threading.Thread(target=lambda: got.append(ring.acquire_write()))
    t.start()
    time.sleep(0.2)
    assert t.is_alive() and not got  # still waiting
    batch = ring.take(1)
    ring.release(batch.slots)
    t.join(5)
    assert got == [int(batch.slots[0])]


def test_backpressure_wait_ends_on_stop():
    ring = FrameRing(2, (2, 2), np.uint8, timeout_s=None)
    _put(ring, 0)
    _put(ring, 1)
    stop = threading.Event()
    threading.Timer(0.1, stop.set).start()
    assert ring.acquire_write(stop=stop) is None


def test_free_running_exact_accounting_fast_producer_slow_consumer():
    n = 3000
    frames = np.arange(n, dtype=np.int32)[:, None, None] * np.ones((1, 4, 4), np.int32)
    ring = FrameRing(4, (4, 4), np.int32, policy="free-running")
    source = ArraySource(frames)
    thread, _ = source.start(ring)
    seen: list[int] = []
    while True:
        batch = ring.take(2, timeout=5)
        for s, fid in zip(batch.slots.tolist(), batch.frame_ids.tolist(), strict=True):
            assert (ring.slab[s] == fid).all()
            seen.append(fid)
        ring.release(batch.slots)
        time.sleep(2e-4)  # a slow consumer
        if batch.closed:
            break
    thread.join(5)
    st = ring.stats()
    assert st["dropped"] > 0
    assert st["received"] + st["dropped"] == n == source.stats.sent
    assert source.stats.received == st["received"] and source.stats.dropped == st["dropped"]
    missing = sorted(set(range(n)) - set(seen))
    assert ring.lost_ids().tolist() == missing
    assert seen == sorted(seen)


def test_latest_policy_overwrites_the_oldest_unread_frame():
    ring = FrameRing(3, (2, 2), np.int16, policy="latest")
    for i in range(5):
        _put(ring, i)
    batch = ring.take(5)
    assert batch.frame_ids.tolist() == [2, 3, 4]
    st = ring.stats()
    assert st["overwritten"] == 2 and st["received"] == 5 and ring.lost_ids().tolist() == [0, 1]
    # a leased slot is never reclaimed: all three are leased, so the next frame is dropped
    assert ring.acquire_write() is None


def test_consumer_sees_the_slot_memory_itself():
    alloc = HostAllocator()
    ring = FrameRing(8, (16, 16), np.uint16, allocator=alloc)
    for i in range(6):
        slot = ring.acquire_write()
        buf = ring.slot_buffer(slot)  # what recv_into would write
        buf[:] = np.full((16, 16), i, np.uint16).tobytes()
        ring.commit(slot, i)
    batch = ring.take(6)
    for s in batch.slots:
        assert np.shares_memory(ring.slot_view(s), ring.slab)
    pieces = ring.segments(batch.slots)
    assert len(pieces) == 1 and pieces[0][:2] == (0, 6)
    view = pieces[0][2]
    assert np.shares_memory(view, ring.slab) and view.base is not None
    assert [int(v[0, 0]) for v in view] == batch.frame_ids.tolist()
    ring.release(batch.slots)
    # after the ring wraps, a batch splits into two zero-copy runs
    for i in range(6, 10):
        _put(ring, i)
    batch = ring.take(4)
    runs = ring.segments(batch.slots)
    assert [(i, j) for i, j, _ in runs] == [(0, 2), (2, 4)]
    assert all(np.shares_memory(v, ring.slab) for _, _, v in runs)


def test_take_stops_at_end_of_series_and_reports_close():
    ring = FrameRing(8, (2, 2), np.uint8)
    for i in range(3):
        _put(ring, i)
    ring.mark_end(7)
    _put(ring, 3)
    ring.close_input()
    first = ring.take(10)
    assert first.frame_ids.tolist() == [0, 1, 2] and first.end_series == 7 and not first.closed
    second = ring.take(10)
    assert second.frame_ids.tolist() == [3] and second.end_series is None and second.closed
    ring.release(first.slots)
    ring.release(second.slots)
    assert ring.exhausted and len(ring.take(4, timeout=0)) == 0


def test_take_waits_for_min_n_or_the_deadline():
    ring = FrameRing(8, (2, 2), np.uint8)
    _put(ring, 0)
    t0 = time.monotonic()
    batch = ring.take(4, timeout=0.1, min_n=4)  # deadline flush of a partial batch
    assert len(batch) == 1 and time.monotonic() - t0 >= 0.09
    threading.Timer(0.05, lambda: [_put(ring, i) for i in (1, 2, 3, 4)]).start()
    batch = ring.take(4, timeout=5, min_n=4)
    assert batch.frame_ids.tolist() == [1, 2, 3, 4]


def test_threaded_producer_consumer_delivers_every_frame_in_order_untouched():
    n = 2000
    ring = FrameRing(6, (32, 32), np.int64, policy="backpressure", timeout_s=None)

    def produce():
        for i in range(n):
            slot = ring.acquire_write()
            ring.slot_view(slot)[...] = i
            ring.commit(slot, i)
        ring.close_input()

    t = threading.Thread(target=produce)
    t.start()
    rng = np.random.default_rng(0)
    seen: list[int] = []
    while True:
        batch = ring.take(int(rng.integers(1, 5)), timeout=5)
        for s, fid in zip(batch.slots.tolist(), batch.frame_ids.tolist(), strict=True):
            assert (ring.slab[s] == fid).all()
        time.sleep(float(rng.uniform(0, 2e-4)))  # the producer runs meanwhile: leased slots must stay intact
        for s, fid in zip(batch.slots.tolist(), batch.frame_ids.tolist(), strict=True):
            assert (ring.slab[s] == fid).all()
        seen += batch.frame_ids.tolist()
        ring.release(batch.slots)
        if batch.closed:
            break
    t.join(5)
    assert seen == list(range(n))
    st = ring.stats()
    assert st["dropped"] == 0 and st["high_water"] <= 6


def test_take_never_waits_for_more_than_the_free_slots_can_hold():
    ring = FrameRing(4, (2, 2), np.uint8)
    for i in range(3):
        _put(ring, i)
    held = ring.take(2)
    _put(ring, 3)
    t0 = time.monotonic()
    batch = ring.take(8, timeout=5, min_n=8)  # only 2 slots are not held: returns as soon as 2 are ready
    assert batch.frame_ids.tolist() == [2, 3] and time.monotonic() - t0 < 2
    ring.release(held.slots)
