"""Detector masks per series: a new series header may carry a new mask; earlier frames keep theirs."""

from __future__ import annotations

import numpy as np
import pytest

from edgeptycho.stream.detector_sim import DetectorSimulator, v1_end, v1_header
from edgeptycho.stream.ring import FrameRing
from edgeptycho.stream.sources.dectris_v1 import DectrisV1Source

H, W = 6, 10


def _mask(bad_row):
    m = np.zeros((H, W), np.uint32)
    m[bad_row] = 1
    return m


def test_v1_each_series_keeps_the_mask_its_header_sent():
    src = DectrisV1Source("tcp://127.0.0.1:1", frame_shape=(H, W), dtype=np.uint16)
    src.attach(FrameRing(8, (H, W), np.uint16, policy="latest"))
    config = {"x_pixels_in_detector": W, "y_pixels_in_detector": H, "nimages": 1, "ntrigger": 1}
    flat = np.ones((H, W), np.float32)
    table = np.zeros((1000, 2), np.float32)
    src.handle_safely(v1_header(1, "all", config, {"mask": _mask(0), "flatfield": flat, "countrate_table": table}))
    src.handle_safely(v1_end(1))
    src.handle_safely(v1_header(2, "all", config, {"mask": _mask(3), "flatfield": flat, "countrate_table": table}))
    src.handle_safely(v1_header(3, "basic", config))  # no arrays: the detector's mask is unchanged
    # Series 1's frames may still be in the ring after series 2's header: they keep series 1's mask.
    np.testing.assert_array_equal(src.mask_for(1), _mask(0))
    np.testing.assert_array_equal(src.mask_for(2), _mask(3))
    np.testing.assert_array_equal(src.mask_for(3), _mask(3))
    np.testing.assert_array_equal(src.mask, _mask(3))


def test_v2_start_messages_give_per_series_masks():
    pytest.importorskip("cbor2")
    from edgeptycho.stream.sources.dectris_v2 import DectrisV2Source

    frames = np.zeros((1, H, W), np.uint16)
    sim = DetectorSimulator(frames, protocol="stream2", endpoint="tcp://127.0.0.1:0", mask=_mask(1),
                            first_series=5)
    src = DectrisV2Source(frame_shape=(H, W), dtype=np.uint16)
    src.attach(FrameRing(8, (H, W), np.uint16, policy="latest"))
    src.handle_safely(sim._v2_start("A"))
    sim.series, sim.mask = 6, _mask(4)
    src.handle_safely(sim._v2_start("B"))
    np.testing.assert_array_equal(src.mask_for(5), _mask(1))
    np.testing.assert_array_equal(src.mask_for(6), _mask(4))
