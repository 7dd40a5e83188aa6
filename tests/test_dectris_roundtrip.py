"""Detector simulator → loopback ZeroMQ → receiver → ring reproduces every frame bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest

from edgeptycho.stream import codecs
from edgeptycho.stream.detector_sim import DetectorSimulator, synthetic_frames
from edgeptycho.stream.positions import PositionTable
from edgeptycho.stream.ring import FrameRing
from edgeptycho.stream.sources.dectris_v1 import DectrisV1Source
from edgeptycho.stream.sources.dectris_v2 import DectrisV2Source

pytest.importorskip("cbor2")
pytest.importorskip("lz4")
SOURCES = {"stream1": DectrisV1Source, "stream2": DectrisV2Source}


def _collect(ring, timeout=10.0):
    """Frames by id and the batches' metadata until the source closes the ring."""
    got, meta = {}, []
    while True:
        b = ring.take(16, timeout=timeout)
        for s, fid in zip(b.slots, b.frame_ids, strict=True):
            got[int(fid)] = ring.slab[s].copy()
        meta.append(b.meta)
        ring.release(b.slots)
        if b.closed or (not len(b) and b.end_series is None):
            return got, np.concatenate(meta)


def _roundtrip(protocol, encoding, frames, repeat=1, positions=None, slots=8, **source_kw):
    sim = DetectorSimulator(frames, protocol=protocol, endpoint="tcp://127.0.0.1:0", encoding=encoding)
    try:
        endpoint = sim.bind()
        ring = FrameRing(slots, frames.shape[1:], frames.dtype)
        src = SOURCES[protocol](endpoint, frame_shape=frames.shape[1:], dtype=frames.dtype, max_series=repeat,
                                positions=positions, idle_timeout_s=20, **source_kw)
        thread, _ = src.start(ring)
        sender = threading.Thread(target=sim.run, args=(repeat,))
        sender.start()
        got, meta = _collect(ring)
        sender.join(20)
        thread.join(20)
    finally:
        sim.close()
    return src, got, meta


@pytest.mark.parametrize("protocol", ["stream1", "stream2"])
@pytest.mark.parametrize("encoding", ["bslz4", "lz4", "none"])
@pytest.mark.parametrize("shape, dtype", [((256, 256), np.uint32), ((514, 1030), np.uint16)])
def test_every_frame_arrives_bit_for_bit(protocol, encoding, shape, dtype):
    frames = synthetic_frames(3, shape, dtype, seed=11)
    src, got, _ = _roundtrip(protocol, encoding, frames)
    assert sorted(got) == [0, 1, 2]
    for i in range(3):
        np.testing.assert_array_equal(got[i], frames[i])
    assert src.stats.received == 3 and src.stats.malformed == 0 and src.series_done == 1
    assert src.mask is not None and src.mask.shape == shape  # header_detail "all"
    # Compressed frames are decoded straight into their slot when a C decoder is at hand; raw ones copied once.
    codec = {"bslz4": codecs.BSLZ4, "none": codecs.RAW,
             "lz4": codecs.LZ4_BLOCK if protocol == "stream1" else codecs.LZ4}[encoding]
    direct = codecs.backend(codec).endswith("-ctypes")
    assert src.landing == {"direct": 3 * direct, "copied": 3 * (not direct)}


@pytest.mark.parametrize("protocol", ["stream1", "stream2"])
def test_decode_pool_lands_every_frame_and_ends_series_after_them(protocol):
    frames = synthetic_frames(12, (514, 1030), np.uint16, seed=5)
    src, got, _ = _roundtrip(protocol, "bslz4", frames, slots=6, decode_threads=2)
    assert sorted(got) == list(range(12)) and src.stats.received == 12
    for i in range(12):
        np.testing.assert_array_equal(got[i], frames[i])


def test_repeated_series_and_positions_by_frame_id():
    frames = synthetic_frames(4, (64, 64), np.uint16, seed=2)
    pos = np.arange(8, dtype=float).reshape(4, 2) * 1e-7
    src, got, meta = _roundtrip("stream2", "bslz4", frames, repeat=2,
                                positions=PositionTable.from_array(pos, pixel_m=1e-8))
    assert src.series_done == 2 and src.stats.received == 8
    assert sorted(set(meta["series_id"].tolist())) == [1, 2]
    for row in meta:
        np.testing.assert_allclose(row["position_m"], pos[row["frame_id"]])
        np.testing.assert_allclose(row["position_px"], pos[row["frame_id"]] / 1e-8)


def test_free_running_detector_counts_what_nobody_took():
    frames = synthetic_frames(5, (32, 32), np.uint16)
    sim = DetectorSimulator(frames, protocol="stream2", endpoint="tcp://127.0.0.1:0", mode="free-running",
                            control_timeout_s=0.2)
    try:
        report = sim.send_series()  # nobody connected: a DCU drops and counts, it does not wait
    finally:
        sim.close()
    assert report["sent"] == 0 and report["dropped"] == 5


def test_non_loopback_endpoint_needs_explicit_permission():
    frames = synthetic_frames(1, (8, 8), np.uint16)
    with pytest.raises(ValueError, match="loopback"):
        DetectorSimulator(frames, endpoint="tcp://*:31001")


def test_command_line_simulator_feeds_the_receiver(tmp_path):
    """`edgeptycho simulate-detector` in its own process, as a beamline would run it."""
    cmd = [sys.executable, "-m", "edgeptycho.cli", "simulate-detector", "--protocol", "stream1",
           "--endpoint", "tcp://127.0.0.1:0", "--frames", "6", "--shape", "64", "64", "--dtype", "uint16",
           "--rate", "500"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        hello = json.loads(proc.stdout.readline())
        ring = FrameRing(8, (64, 64), np.uint16)
        src = DectrisV1Source(hello["endpoint"], frame_shape=(64, 64), dtype=np.uint16, max_series=1,
                              idle_timeout_s=30)
        thread, _ = src.start(ring)
        got, _ = _collect(ring, timeout=30)
        thread.join(10)
        report = json.loads(proc.stdout.readline())
    finally:
        proc.wait(30)
    expected = synthetic_frames(6, (64, 64), np.uint16)
    assert sorted(got) == list(range(6)) and report["sent"] == 6 and report["dropped"] == 0
    for i in range(6):
        np.testing.assert_array_equal(got[i], expected[i])
