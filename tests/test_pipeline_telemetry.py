"""Telemetry: stage timestamps, histogram percentiles, latency intervals and overhead."""

from __future__ import annotations

import numpy as np
import pytest

from edgeptycho.pipeline.telemetry import LatencyHistogram, StageClock, Telemetry


def test_histogram_percentiles_match_numpy_within_a_bin():
    rng = np.random.default_rng(0)
    v = rng.lognormal(np.log(2e-3), 0.5, 20000)
    h = LatencyHistogram()
    h.record(v[:10000])
    h.record(v[10000:])
    for q in (50, 90, 99):
        assert h.percentile(q) == pytest.approx(np.percentile(v, q), rel=0.03)
    s = h.summary()
    assert s["count"] == 20000 and s["max"] == pytest.approx(v.max() * 1e3)


def test_empty_histogram_and_nonfinite_values():
    h = LatencyHistogram()
    assert h.percentile(50) is None and h.summary()["p99"] is None
    h.record(np.array([np.nan, 1e-3]))
    assert h.total == 1


def test_stage_clock_wraps_by_sequence_number():
    c = StageClock(8)
    c.stamp("received", np.arange(10, 14), 1.0)
    c.stamp("published", np.arange(10, 14), np.array([1.5, 2.0, 2.5, 3.0]))
    np.testing.assert_allclose(c.interval(np.arange(10, 14), "received", "published"), [0.5, 1.0, 1.5, 2.0])


def test_published_records_intervals_and_overhead():
    t = Telemetry(64)
    seq = np.arange(4)
    t.stamp("received", seq, np.array([0.0, 0.001, 0.002, 0.003]))
    t.stamp("batched", seq, 0.004)
    t.stamp("submitted", seq, 0.005)
    t.stamp("inferred", seq, 0.015)
    t.published(seq, 0.016)
    h = t.hist
    assert h["receive_to_published"].total == 4
    assert h["batched_to_inferred"].percentile(50) == pytest.approx(0.011, rel=0.03)
    # overhead = total − formation − compute = (submitted − batched) + (published − inferred) = 2 ms
    assert h["overhead"].percentile(50) == pytest.approx(0.002, rel=0.03)
    st = t.status()
    assert st["latency_ms"]["overhead"]["count"] == 4
    assert t.status()["latency_recent_ms"]["overhead"]["count"] == 0  # "recent" resets at each status


def test_published_bins_every_interval_exactly_as_record_would():
    tel = Telemetry(256)
    rng = np.random.default_rng(4)
    seq = np.arange(40)
    t0 = rng.uniform(0, 1, 40)
    tel.received(seq, t0 + tel.wall.offset)
    tel.stamp("batched", seq, t0 + rng.uniform(0, 0.01, 40))
    tel.stamp("submitted", seq, t0 + 0.02)
    tel.stamp("inferred", seq[:30], t0[:30] + 0.05)  # 10 frames never inferred: NaN intervals are skipped
    t_det = np.where(np.arange(40) % 2, np.nan, t0 - 0.001 + tel.wall.offset)
    tel.published(seq, t=2.0, t_detector=t_det)
    rows = tel.clock.t[seq]
    i = tel.clock.index
    ref = {"receive_to_batched": rows[:, i["batched"]] - rows[:, i["received"]],
           "batched_to_inferred": rows[:, i["inferred"]] - rows[:, i["batched"]],
           "inferred_to_published": rows[:, i["published"]] - rows[:, i["inferred"]],
           "receive_to_published": rows[:, i["published"]] - rows[:, i["received"]],
           "detector_to_published": tel.wall.to_unix(2.0) - t_det}
    ref["overhead"] = (ref["receive_to_published"] - ref["receive_to_batched"]
                       - (rows[:, i["inferred"]] - rows[:, i["submitted"]]))
    for name, v in ref.items():
        h = LatencyHistogram()
        h.record(v)
        for got in (tel.hist[name], tel.recent[name]):
            assert got.total == h.total and np.array_equal(got.counts, h.counts), name
            assert got.sum == pytest.approx(h.sum) and got.max == h.max
    assert tel.hist["batched_to_inferred"].total == 30 and tel.hist["detector_to_published"].total == 20


def test_latencies_are_binned_before_the_stage_clock_reuses_their_rows():
    # binning waits for a reader (status at 1 Hz), but never past a quarter of the clock: with no reader,
    # 4 laps of the clock still give every frame its own latency
    tel = Telemetry(64)
    lat = []
    for b in range(32):  # 256 frames in batches of 8 through a 64-row clock
        seq = np.arange(8 * b, 8 * b + 8)
        t0 = 10.0 * b + np.arange(8) * 1e-3
        tel.received(seq, t0 + tel.wall.offset)
        for stage in ("batched", "submitted", "inferred"):
            tel.stamp(stage, seq, t0 + 0.001)
        tel.published(seq, t=10.0 * b + 0.1 + 1e-3 * b)
        lat.append((10.0 * b + 0.1 + 1e-3 * b) - ((t0 + tel.wall.offset) - tel.wall.offset))
    ref = LatencyHistogram()
    ref.record(np.concatenate(lat))
    got = tel.hist["receive_to_published"]
    assert got.total == 256 and np.array_equal(got.counts, ref.counts) and got.max == ref.max
