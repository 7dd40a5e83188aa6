"""Batcher: preprocessing into pooled backend batches, ring slots released early, double buffering, flushes."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from pipeline_support import tiny_artifact_path

from edgeptycho.hw.registry import open_backend
from edgeptycho.model.artifact import ModelArtifact
from edgeptycho.model.preprocess import preprocess
from edgeptycho.pipeline.batcher import Batcher, BatchPool
from edgeptycho.pipeline.stages import Port
from edgeptycho.pipeline.telemetry import Telemetry
from edgeptycho.stream.ring import FrameRing


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    return tiny_artifact_path(tmp_path_factory)


@pytest.fixture
def setup(tiny_artifact):
    art = ModelArtifact.load(tiny_artifact)
    backend = open_backend("cpu", art.path, 8, threads=1)
    size = art.metadata["frame_size"]
    ring = FrameRing(32, (size, size), np.uint32)
    pool = BatchPool(backend, 2)
    port = Port("out")
    batcher = Batcher(ring, pool, port, art.preprocess, Telemetry(1024), max_wait_s=10.0)
    frames = np.random.default_rng(0).poisson(3.0, (40, size, size)).astype(np.uint32)
    thread = threading.Thread(target=batcher.run, daemon=True)
    yield art, ring, pool, port, batcher, frames, thread
    ring.close_input()
    batcher.stop.set()
    if thread.is_alive():
        thread.join(5)
    backend.close()


def _commit(ring, frames, first_id=0):
    for k, f in enumerate(frames):
        slot = ring.acquire_write()
        ring.slot_view(slot)[...] = f
        ring.commit(slot, first_id + k)


def test_batch_holds_preprocessed_frames_and_ring_slots_are_already_free(setup):
    art, ring, pool, port, batcher, frames, thread = setup
    _commit(ring, frames[:8])
    thread.start()
    slot = port.get()
    assert slot.n == 8 and slot.reason == "full"
    assert ring.stats()["in_flight"] == 0  # released before the batch was even handed on
    np.testing.assert_allclose(slot.inputs[:8], preprocess(frames[:8], art.preprocess), rtol=1e-6)
    assert slot.meta["frame_id"][:8].tolist() == list(range(8))
    assert batcher.counters["payload_writes"] == 8 and batcher.counters["gathers"] == 0


def test_next_batch_fills_while_the_previous_one_is_held(setup):
    _, ring, pool, port, batcher, frames, thread = setup
    _commit(ring, frames[:24])
    thread.start()
    first = port.get()  # "inferring": not returned to the pool
    second = port.get()  # filled meanwhile from the second preallocated batch
    assert (first.index, second.index) == (0, 1) and second.n == 8
    time.sleep(0.1)
    assert port.empty()  # the pool is exhausted: the third batch waits, frames stay queued in the ring
    assert ring.stats()["queued"] == 8
    pool.put(first)
    third = port.get()
    assert third.index == 0 and third.meta["frame_id"][0] == 16


def test_end_of_scan_flushes_the_partial_batch(setup):
    _, ring, pool, port, batcher, frames, thread = setup
    _commit(ring, frames[:11])
    ring.mark_end(3)
    thread.start()
    full = port.get()
    pool.put(full)
    tail = port.get()
    assert tail.n == 3 and tail.end_series == 3 and tail.reason == "end"


def test_deadline_flushes_a_partial_batch(setup):
    _, ring, pool, port, batcher, frames, thread = setup
    batcher.max_wait_s = 0.02
    thread.start()
    _commit(ring, frames[:3])
    slot = port.get()
    assert slot.n == 3 and slot.reason == "deadline"


def test_closed_input_ends_the_batcher_with_a_final_flush(setup):
    _, ring, pool, port, batcher, frames, thread = setup
    _commit(ring, frames[:5])
    ring.close_input()
    thread.start()
    slot = port.get()
    assert slot.n == 5 and slot.closed and slot.reason == "close"
    thread.join(5)
    assert not thread.is_alive()


def test_pool_needs_two_batches(setup):
    art, *_ = setup
    backend = open_backend("cpu", art.path, 4, threads=1)
    with pytest.raises(ValueError, match="double buffering"):
        BatchPool(backend, 1)
    backend.close()


@pytest.mark.parametrize("b", [1, 2, 4])
@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.float32])
def test_preprocess_into_a_batch_matches_the_reference_and_leaves_frames_alone(b, dtype):
    """The batcher's one write: binned frames straight into the input batch, log and normalise in place."""
    from edgeptycho.model.preprocess import PreprocessSpec, preprocess_into

    frames = np.random.default_rng(b).poisson(20, (5, 64, 64)).astype(dtype)
    keep = frames.copy()
    ref = frames.reshape(5, 64 // b, b, 64 // b, b).sum(axis=(-3, -1), dtype=np.float64)
    ref = np.log1p(ref)
    ref /= ref.reshape(5, -1).mean(axis=1)[:, None, None]
    batch = np.full((8, 1, 64 // b, 64 // b), -1, np.float32)
    preprocess_into(frames, batch[2:7], PreprocessSpec(bin=b))
    np.testing.assert_allclose(batch[2:7, 0], ref, rtol=2e-6)
    assert (batch[:2] == -1).all() and (batch[7:] == -1).all()
    np.testing.assert_array_equal(frames, keep)


def test_each_series_is_preprocessed_with_its_own_detector_mask(setup):
    """A new series can bring a new mask: frames still queued from the previous series keep theirs."""
    art, ring, pool, port, batcher, frames, thread = setup
    size = frames.shape[-1]
    masks = {0: np.zeros((size, size), np.uint32), 1: np.zeros((size, size), np.uint32)}
    masks[0][:, :3] = 1
    masks[1][5:9, :] = 1
    asked = []
    batcher.mask_provider = lambda sid: asked.append(sid) or masks[sid]
    for k in range(16):  # both series are in the ring before the batcher looks at either
        slot = ring.acquire_write()
        ring.slot_view(slot)[...] = frames[k]
        ring.commit(slot, k, series_id=k // 8)
    thread.start()
    first, second = port.get(), port.get()
    np.testing.assert_allclose(first.inputs[:8], preprocess(frames[:8], art.preprocess, masks[0]), rtol=1e-6)
    np.testing.assert_allclose(second.inputs[:8], preprocess(frames[8:16], art.preprocess, masks[1]), rtol=1e-6)
    assert asked == [0, 1]  # looked up once per series, not per frame or batch


def test_a_take_spanning_two_series_splits_at_the_change(setup):
    art, ring, pool, port, batcher, frames, thread = setup
    size = frames.shape[-1]
    masks = {3: np.zeros((size, size), np.uint32), 4: np.ones((size, size), np.uint32)}
    batcher.mask_provider = masks.get
    for k in range(8):  # no end marker between the series (a detector that skipped its end message)
        slot = ring.acquire_write()
        ring.slot_view(slot)[...] = frames[k]
        ring.commit(slot, k, series_id=3 if k < 5 else 4)
    thread.start()
    got = port.get()
    np.testing.assert_allclose(got.inputs[:5], preprocess(frames[:5], art.preprocess, masks[3]), rtol=1e-6)
    np.testing.assert_allclose(got.inputs[5:8], preprocess(frames[5:8], art.preprocess, masks[4]), rtol=1e-6)


def test_runs_are_preprocessed_in_cache_sized_chunks_with_the_same_result(setup):
    art, ring, pool, port, batcher, frames, thread = setup
    assert batcher.chunk >= 1
    batcher.chunk = 3  # 8 frames per batch → calls of 3, 3, 2 frames
    _commit(ring, frames[:8])
    thread.start()
    got = port.get()
    np.testing.assert_allclose(got.inputs[:8], preprocess(frames[:8], art.preprocess), rtol=1e-6)


def test_detector_roi_puts_the_models_zero_frequency_on_the_beam():
    from edgeptycho.pipeline.batcher import detector_roi

    assert detector_roi((256, 256), 256) is None  # the model's own frame size: no region needed
    # EIGER 500K (514 x 1030), default: centred on the frame's zero-frequency pixel (h//2, w//2)
    r, c, n = detector_roi((514, 1030), 256)
    assert (r + n // 2, c + n // 2) == (257, 515) and n == 256
    r, c, _ = detector_roi((514, 1030), 256, (300.4, 600.6))  # a beam off centre, rounded to a pixel
    assert (r + 128, c + 128) == (300, 601)
    with pytest.raises(ValueError, match="roi_center"):
        detector_roi((514, 1030), 256, (100, 600))  # rows -28..228: off the detector
    with pytest.raises(ValueError, match="smaller"):
        detector_roi((200, 1030), 256)
