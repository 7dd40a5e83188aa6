"""The streaming pipeline end to end with the tiny model: accounting, end-of-scan flush, drops, shutdown."""

from __future__ import annotations

import time

import numpy as np
import pytest
from pipeline_support import Collector, SlowBackend, small_scan, tiny_artifact_path

from edgeptycho.hw.registry import open_backend
from edgeptycho.model.artifact import ModelArtifact
from edgeptycho.pipeline.runner import BatcherConfig, OutputConfig, Pipeline, ScanInfo
from edgeptycho.stream.publish import Publisher
from edgeptycho.stream.ring import RingConfig
from edgeptycho.stream.sources.base import Source
from edgeptycho.stream.sources.replay import ArraySource


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    return tiny_artifact_path(tmp_path_factory)


@pytest.fixture(scope="module")
def scan():
    return small_scan(70)


def _pipeline(art_path, source, scan, batch=16, publisher=None, ring=None, backend=None, **kw):
    art = ModelArtifact.load(art_path)
    backend = backend or open_backend("cpu", art.path, batch, threads=1)
    return Pipeline(source, backend, art.preprocess, art.output_size, ring or RingConfig(slots=16),
                    scan=ScanInfo.from_scan(scan), publisher=publisher, model_info=art.metadata, **kw)


def test_every_frame_is_published_once_in_order_and_the_last_partial_batch_is_inferred(tiny_artifact, scan, tmp_path):
    pub = Publisher("tcp://127.0.0.1:*")
    sub = Collector(pub.endpoint)
    pipe = _pipeline(tiny_artifact, ArraySource.from_scan(scan), scan, batch=16, publisher=pub,
                     output=OutputConfig(cxi=str(tmp_path / "r.cxi")))
    rep = pipe.run(timeout=60)
    sub.close(expect_patches=scan.n_frames)
    pub.close()
    assert rep["frames_received"] == rep["frames_inferred"] == rep["frames_published"] == scan.n_frames == 70
    # 70 = 4 × 16 + 6: the 6 trailing frames go out in a partial batch flushed at the end of the scan.
    assert rep["batches"]["end"] == 1 and rep["batches"]["batches"] >= 5
    assert sub.patch_ids == list(range(70))
    assert rep["dropped"] == 0
    assert rep["copies_per_frame"]["slot_to_input"] == 1.0 and rep["copies_per_frame"]["gathers"] == 0.0
    assert rep["written"] == [str(tmp_path / "r.cxi")]
    finals = [m for m in sub.mosaics if m.header.get("final")]
    assert len(finals) == 1 and finals[0].header["n_frames"] == 70
    status = sub.status[-1]
    assert status["final"] is True
    for key in ("rates_hz", "latency_ms", "drops", "queues", "counters"):
        assert key in status
    assert status["latency_ms"]["receive_to_published"]["count"] == 70


def test_final_cxi_holds_the_stitched_object(tiny_artifact, scan, tmp_path):
    from edgeptycho.io.cxi import read_reconstruction

    pipe = _pipeline(tiny_artifact, ArraySource.from_scan(scan), scan, output=OutputConfig(cxi=str(tmp_path / "r.cxi")))
    pipe.run(timeout=60)
    pipe.backend.close()
    recon = read_reconstruction(tmp_path / "r.cxi")
    res = pipe.results[0]
    assert recon.object.shape == res.object.shape
    np.testing.assert_allclose(recon.object, res.object, rtol=1e-5, atol=1e-6)
    assert recon.pixel_m == pytest.approx(scan.object_pixel_m)
    assert recon.origin_m == pytest.approx(tuple(v * scan.object_pixel_m for v in res.origin_px))


def test_free_running_overload_accounts_for_every_frame(tiny_artifact, scan):
    art = ModelArtifact.load(tiny_artifact)
    slow = SlowBackend(open_backend("cpu", art.path, 4, threads=1), delay_s=0.02)
    src = ArraySource.from_scan(scan, rate_hz=1000)  # ~5x what 4 frames per 20 ms can take
    pub = Publisher("tcp://127.0.0.1:*")
    sub = Collector(pub.endpoint)
    pipe = _pipeline(tiny_artifact, src, scan, publisher=pub, backend=slow,
                     ring=RingConfig(slots=4, policy="free-running"), batcher=BatcherConfig(max_wait_ms=1, pool=2))
    rep = pipe.run(timeout=60)
    sub.close(expect_patches=rep["frames_published"])
    pub.close()
    lost = set(pipe.ring.lost_ids().tolist())
    published = sub.patch_ids
    assert rep["dropped"] > 0
    assert rep["source"]["sent"] == scan.n_frames == rep["frames_received"] + rep["dropped"]
    assert rep["frames_published"] == rep["frames_received"]
    assert len(published) == len(set(published)) == rep["frames_received"]
    assert lost.isdisjoint(published) and lost | set(published) == set(range(scan.n_frames))
    assert published == sorted(published)


def test_stalled_subscriber_never_stalls_the_pipeline(tiny_artifact, scan):
    import zmq

    pub = Publisher("tcp://127.0.0.1:*", sndhwm=2, count_drops=True)
    pub.sock.setsockopt(zmq.SNDBUF, 4096)  # tiny kernel buffers: the stall shows after a few messages
    stalled = zmq.Context.instance().socket(zmq.SUB)  # connected, subscribed, never reads
    stalled.setsockopt(zmq.RCVHWM, 1)
    stalled.setsockopt(zmq.RCVBUF, 4096)
    stalled.setsockopt(zmq.SUBSCRIBE, b"")
    stalled.setsockopt(zmq.LINGER, 0)
    stalled.connect(pub.endpoint)
    time.sleep(0.2)
    pipe = _pipeline(tiny_artifact, ArraySource.from_scan(scan), scan, publisher=pub)
    rep = pipe.run(timeout=60)
    stalled.close()
    pub.close()
    assert rep["frames_published"] == scan.n_frames
    assert rep["publisher"]["dropped"]["patch"] > 0  # the stalled reader's queue filled and sends moved on


def test_stop_drains_frames_already_received(tiny_artifact, scan):
    src = ArraySource.from_scan(scan, rate_hz=100)
    pipe = _pipeline(tiny_artifact, src, scan)
    pipe.start()
    time.sleep(0.25)
    pipe.stop()
    assert pipe.wait(30)
    rep = pipe.report()
    assert 0 < rep["frames_received"] < scan.n_frames
    assert rep["frames_received"] == rep["frames_inferred"] == rep["frames_published"]
    assert pipe.ring.stats()["in_flight"] == 0 and pipe.pool.free == len(pipe.pool.slots)


class _TwoScans(Source):
    name = "two-scans"

    def __init__(self, scan):
        super().__init__()
        self.parts = [ArraySource.from_scan(scan, series_id=s, first_id=0, close_at_end=False) for s in (7, 8)]
        self.scan = scan

    def frame_spec(self):
        return self.parts[0].frame_spec()

    def run(self, ring, stop):
        try:
            for p in self.parts:
                p.run(ring, stop)
        finally:
            ring.close_input()
        return self.stats


def test_each_scan_gets_its_own_final_reconstruction(tiny_artifact, scan, tmp_path):
    pipe = _pipeline(tiny_artifact, _TwoScans(scan), scan, output=OutputConfig(cxi=str(tmp_path / "s{series}.cxi")))
    rep = pipe.run(timeout=60)
    assert rep["frames_published"] == 2 * scan.n_frames
    assert sorted(pipe.results) == [7, 8]
    assert sorted(rep["written"]) == [str(tmp_path / "s7.cxi"), str(tmp_path / "s8.cxi")]
    assert rep["batches"]["end"] == 2
    # each series keeps its own live mosaic after it ends (refinements may land after the next one starts)
    a, b = pipe.post.stitcher_for(7), pipe.post.stitcher_for(8)
    assert a is not None and b is not None and a is not b
    assert a.n_added == b.n_added == scan.n_frames and pipe.post.stitcher_for(9) is None


def test_frames_are_preprocessed_into_the_batch_in_order(tiny_artifact, scan):
    """The batch the backend sees holds exactly preprocess(frames) of the frames it is labelled with."""
    from edgeptycho.model.preprocess import preprocess

    art = ModelArtifact.load(tiny_artifact)
    seen = []
    real = open_backend("cpu", art.path, 16, threads=1)

    class Spy(SlowBackend):
        def submit(self, inputs, outputs, n=None):
            seen.append(inputs[:n].copy())
            return real.submit(inputs, outputs, n=n)

    pipe = _pipeline(tiny_artifact, ArraySource.from_scan(scan), scan, backend=Spy(real, 0.0))
    pipe.start(warmup=False)  # the warm-up batch of zeros would show up first
    assert pipe.wait(60)
    got = np.concatenate(seen)
    np.testing.assert_allclose(got, preprocess(scan.frames, art.preprocess), rtol=1e-6)


def test_a_paced_source_below_capacity_loses_nothing(tiny_artifact, scan):
    """Paced below capacity with backpressure: nothing lost, each frame id published exactly once.

    (The free-running variant at 90 % of bare throughput is a benchmark: whether a loaded machine ever
    stalls longer than the ring lasts is a timing question.)
    """
    src = ArraySource.from_scan(scan, rate_hz=400)
    pub = Publisher("tcp://127.0.0.1:*")
    sub = Collector(pub.endpoint)
    pipe = _pipeline(tiny_artifact, src, scan, ring=RingConfig(slots=8), batcher=BatcherConfig(max_wait_ms=2),
                     publisher=pub)
    rep = pipe.run(timeout=60)
    sub.close(expect_patches=scan.n_frames)
    pub.close()
    assert rep["dropped"] == 0 and rep["frames_published"] == scan.n_frames
    assert sub.patch_ids == list(range(scan.n_frames))
    assert rep["batches"]["deadline"] > 0  # at 400 Hz batches of 16 are flushed by the deadline, not full


class _Oracle(SlowBackend):
    """Returns the true object patch of each frame, in arrival order, phase-referenced like training labels."""

    def __init__(self, backend, amplitude, phase):
        super().__init__(backend, 0.0)
        self.amplitude, self.phase, self.next = amplitude, phase, 0

    def submit(self, inputs, outputs, n=None):
        ticket = self._b.submit(inputs, outputs, n=n)  # real call for the ticket; outputs overwritten below
        k = self.next
        outputs["amplitude"][:n, 0] = self.amplitude[k:k + n]
        outputs["phase"][:n, 0] = self.phase[k:k + n]
        self.next += n
        return ticket


def test_true_patches_streamed_through_the_pipeline_rebuild_the_object(tiny_artifact, scan, tmp_path):
    """Positions, patch geometry, offset reconciliation, CXI origin and pixel size agree end to end."""
    from edgeptycho.io.cxi import read_reconstruction
    from edgeptycho.model.dataset import reference_phase
    from edgeptycho.physics.forward import extract_patches
    from edgeptycho.physics.metrics import evaluate
    from edgeptycho.pipeline.stitcher import probe_weight

    art = ModelArtifact.load(tiny_artifact)
    m = art.output_size
    true = extract_patches(scan.object_truth, scan.positions_px(), m)
    phase = reference_phase(true, probe_weight(scan.probe, m))  # each patch's own mean phase removed
    oracle = _Oracle(open_backend("cpu", art.path, 16, threads=1), np.abs(true), phase)
    pipe = _pipeline(tiny_artifact, ArraySource.from_scan(scan), scan, backend=oracle,
                     output=OutputConfig(cxi=str(tmp_path / "r.cxi")))
    pipe.start(warmup=False)
    assert pipe.wait(60)
    scores = evaluate(read_reconstruction(tmp_path / "r.cxi"), scan)
    assert scores["phase_nrmse"] < 0.02 and scores["complex_nrmse"] < 0.05


def test_a_failing_backend_stops_the_pipeline_with_the_error(tiny_artifact, scan):
    class Broken(SlowBackend):
        def submit(self, inputs, outputs, n=None):
            raise RuntimeError("device lost")

    art = ModelArtifact.load(tiny_artifact)
    pipe = _pipeline(tiny_artifact, ArraySource.from_scan(scan), scan,
                     backend=Broken(open_backend("cpu", art.path, 16, threads=1), 0.0))
    pipe.start(warmup=False)
    assert pipe.wait(30)  # no hang: every stage exits
    assert any("device lost" in e for e in pipe.report()["errors"])


def test_frames_without_positions_are_published_but_not_placed(tiny_artifact, scan, tmp_path):
    art = ModelArtifact.load(tiny_artifact)
    pipe = Pipeline(ArraySource(scan.frames), open_backend("cpu", art.path, 16, threads=1), art.preprocess,
                    art.output_size, RingConfig(slots=16), output=OutputConfig(cxi=str(tmp_path / "r.cxi")))
    rep = pipe.run(timeout=60)
    assert rep["frames_published"] == scan.n_frames and rep["errors"] == []
    assert pipe.post.counters["unplaced"] == scan.n_frames
    assert rep["written"] == [] and not (tmp_path / "r.cxi").exists()


def test_a_larger_detector_is_read_through_its_region_of_interest(tiny_artifact, scan):
    """Frames of a bigger detector (beam off centre, bright junk outside the ROI, a bad-pixel mask): the
    pipeline reads the model-sized square around source.roi_center and gives what the cropped frames give."""
    from dataclasses import replace

    from edgeptycho.pipeline.trust import QualityConfig

    n, (r0, c0), big = scan.frame_size, (11, 30), (90, 110)
    frames = np.full((scan.n_frames, *big), 50_000, scan.frames.dtype)
    frames[:, r0:r0 + n, c0:c0 + n] = scan.frames
    mask = np.zeros(big, np.uint32)
    mask[r0 + 5, c0 + 7] = mask[r0 + 40, c0 + 2] = 1
    centre = (r0 + n // 2, c0 + n // 2)
    quality = QualityConfig(every=4, max_backlog=1000)  # never skips a batch: the same frames are checked

    def run(src_frames, mask_, **kw):
        info = replace(ScanInfo.from_scan(scan), mask=mask_)
        art = ModelArtifact.load(tiny_artifact)
        pipe = Pipeline(ArraySource(src_frames, scan.positions_px(), scan.positions_m), open_backend(
            "cpu", art.path, 16, threads=1), art.preprocess, art.output_size, RingConfig(slots=16), scan=info,
            model_info=art.metadata, quality=quality, **kw)
        rep = pipe.run(timeout=60)
        pipe.backend.close()
        return rep, pipe.results[0], pipe.status()["quality"]

    rep_a, ref, q_a = run(scan.frames, mask[r0:r0 + n, c0:c0 + n])
    rep_b, got, q_b = run(frames, mask, roi_center=centre)
    assert rep_b["frames_published"] == scan.n_frames and rep_b["copies_per_frame"]["slot_to_input"] == 1.0
    np.testing.assert_array_equal(got.object, ref.object)
    assert q_b["checked"] == q_a["checked"] > 0  # the residual sees the same region and mask
    assert q_b["residual_p50"] == q_a["residual_p50"] and q_b["residual_p95"] == q_a["residual_p95"]
    with pytest.raises(ValueError, match="roi_center"):
        run(frames, mask, roi_center=(10, 20))  # a 64-px square around it leaves the frame
    with pytest.raises(ValueError, match="smaller than the model"):
        run(frames[:, :60, :60], None)


def test_parallel_cpu_sessions_keep_every_frame_once_and_in_order(tiny_artifact, scan):
    art = ModelArtifact.load(tiny_artifact)
    backend = open_backend("cpu", art.path, 8, threads=2, workers=2)
    pub = Publisher("tcp://127.0.0.1:*")
    sub = Collector(pub.endpoint)
    pipe = _pipeline(tiny_artifact, ArraySource.from_scan(scan), scan, publisher=pub, backend=backend)
    assert pipe.infer.split and pipe.infer.inflight == 2  # a waiter thread completes while the next submits
    rep = pipe.run(timeout=60)
    sub.close(expect_patches=scan.n_frames)
    pub.close()
    backend.close()
    assert rep["frames_published"] == scan.n_frames and rep["dropped"] == 0 and not rep["errors"]
    assert sub.patch_ids == list(range(scan.n_frames))
    assert 0 < rep["backend_busy_fraction"] <= 1.0  # overlapping batches count once


class _OneScanThenQuiet(Source):
    """A live stream that goes quiet after one scan: the source never ends by itself."""

    name = "quiet"

    def __init__(self, scan):
        super().__init__()
        self.part = ArraySource.from_scan(scan, close_at_end=False)

    def frame_spec(self):
        return self.part.frame_spec()

    def run(self, ring, stop):
        self.part.run(ring, stop)
        stop.wait()
        return self.stats


@pytest.mark.parametrize("source", ["scan", "quiet"])
def test_a_backend_failing_in_wait_stops_the_pipeline_with_the_error(tiny_artifact, scan, source):
    class FailsInWait(SlowBackend):
        def wait(self, ticket):
            raise RuntimeError("lost the device while waiting")

    art = ModelArtifact.load(tiny_artifact)
    backend = open_backend("cpu", art.path, 16, threads=2, workers=2)
    if source == "quiet":  # one batch, then silence: the submitting thread is already waiting for the next
        scan = small_scan(16)
    src = ArraySource.from_scan(scan) if source == "scan" else _OneScanThenQuiet(scan)
    pipe = _pipeline(tiny_artifact, src, scan, backend=FailsInWait(backend, 0.0))
    pipe.start(warmup=False)
    # no hang, even when no further batch comes: the waiter's error reaches the submitting thread at once
    assert pipe.wait(30)
    assert any("lost the device while waiting" in e for e in pipe.report()["errors"])
    pipe.stop()
    backend.close()
