"""Block writes into the FrameRing (acquire_many / commit_many) and the unpaced sources that use them."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest

from edgeptycho.stream.ring import FrameRing, RingClosed
from edgeptycho.stream.sources.replay import ArraySource


def test_commit_many_publishes_the_same_records_as_per_frame_commits():
    a, b = FrameRing(8, (4, 4), np.uint16), FrameRing(8, (4, 4), np.uint16)
    pos = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    for k in range(3):
        s = a.acquire_write()
        a.commit(s, 10 + k, series_id=2, position_px=pos[k], position_m=pos[k] * 1e-9, t_detector=5.0,
                 t_received=7.0)
    slots = b.acquire_many(3)
    assert slots == [0, 1, 2]
    b.commit_many(slots, np.arange(10, 13), 2, pos, pos * 1e-9, 5.0, t_received=7.0)
    ta, tb = a.take(8, timeout=0), b.take(8, timeout=0)
    assert ta.meta.tobytes() == tb.meta.tobytes()
    assert b.stats()["received"] == 3 and (b.stamps[:3] == [10, 11, 12]).all()


def test_acquire_many_takes_what_is_free_and_keeps_commit_order():
    ring = FrameRing(6, (2, 2), np.uint8)
    first = ring.acquire_many(4)
    second = ring.acquire_many(4)  # only two left: no waiting for the rest
    assert first == [0, 1, 2, 3] and second == [4, 5]
    ring.commit_many(first, np.arange(4))
    ring.commit_many(second, np.arange(4, 6))  # missing positions and times are NaN
    got = ring.take(6, timeout=0)
    assert got.frame_ids.tolist() == list(range(6))
    assert np.isnan(got.meta["position_px"]).all() and np.isnan(got.meta["t_detector"]).all()
    assert not math.isnan(got.meta["t_received"][0])


def test_acquire_many_follows_the_policies():
    free = FrameRing(2, (2, 2), np.uint8, policy="free-running")
    free.acquire_many(2)
    assert free.acquire_many(1) == []  # never waits: the caller drops the frame
    bp = FrameRing(2, (2, 2), np.uint8, policy="backpressure", timeout_s=0.05)
    bp.commit_many(bp.acquire_many(2), np.arange(2))
    t0 = time.perf_counter()
    assert bp.acquire_many(2) == [] and time.perf_counter() - t0 >= 0.04  # waited its timeout
    latest = FrameRing(2, (2, 2), np.uint8, policy="latest")
    latest.commit_many(latest.acquire_many(2), np.arange(2))
    assert latest.acquire_many(2) == [0] and latest.lost_ids().tolist() == [0]  # the oldest reclaimed
    with pytest.raises(ValueError, match="not all acquired"):
        latest.commit_many([1], np.array([9]))
    latest.close_input()
    with pytest.raises(RingClosed):
        latest.acquire_many(1)


def test_unpaced_free_running_source_accounts_for_every_frame_exactly():
    n = 3000
    frames = np.arange(n, dtype=np.uint32)[:, None, None] * np.ones((1, 4, 4), np.uint32)
    ring = FrameRing(16, (4, 4), np.uint32, policy="free-running")
    src = ArraySource(frames, block=64)
    thread, _ = src.start(ring)
    got: list[int] = []
    while True:  # a slow consumer: the source outruns it and drops
        b = ring.take(4, timeout=0.5)
        for s, fid in zip(b.slots.tolist(), b.frame_ids.tolist(), strict=True):
            assert ring.slab[s][0, 0] == fid  # payload and metadata belong together
        got += b.frame_ids.tolist()
        ring.release(b.slots)
        time.sleep(0.0005)
        if b.closed:
            break
    thread.join(5)
    st = src.stats
    assert st.sent == n and st.received + st.dropped == n and st.dropped > 0
    assert got == sorted(got) and len(got) == st.received
    assert set(got) | set(ring.lost_ids().tolist()) == set(range(n))


def test_block_source_stops_promptly_on_a_full_backpressured_ring():
    ring = FrameRing(4, (4, 4), np.uint16, timeout_s=None)
    stop = threading.Event()
    src = ArraySource(np.zeros((100, 4, 4), np.uint16))
    thread = threading.Thread(target=src.run, args=(ring, stop))
    thread.start()
    time.sleep(0.1)
    assert src.stats.received == 4  # the ring is full; nothing is consumed
    stop.set()
    thread.join(2)
    assert not thread.is_alive() and src.stats.dropped == 0
