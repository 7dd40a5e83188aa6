"""EPICS PVA NTNDArray source: field decoding (codecs, x-first dimensions, uniqueId) and the missing-library error."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from edgeptycho.stream import codecs as c
from edgeptycho.stream.ring import FrameRing
from edgeptycho.stream.sources.base import SourceUnavailable
from edgeptycho.stream.sources.dectris_common import MessageError
from edgeptycho.stream.sources.pva import PvaSource, ntnd_frame

pytest.importorskip("lz4")
H, W = 6, 10
FRAME = np.random.default_rng(4).integers(0, 90, (H, W)).astype(np.uint16)


def _record(uid, value, codec="", params=None, size=0):
    return {"value": value, "codec": {"name": codec, "parameters": params}, "uncompressedSize": size,
            "dimension": [{"size": W}, {"size": H}],  # dimension[0] is x, the fast axis
            "uniqueId": uid, "dataTimeStamp": {"secondsPastEpoch": 1_700_000_000, "nanoseconds": 500_000_000}}


def _compressed(uid, codec, payload):
    return _record(uid, {"ubyteValue": np.frombuffer(payload, np.uint8)}, codec, {"value": 6}, FRAME.nbytes)


@pytest.mark.parametrize("make", [
    lambda: _record(1, ({"ushortValue": FRAME.reshape(-1)},)),  # pvapy wraps the union in a tuple
    lambda: _record(1, FRAME.reshape(-1)),  # p4p hands the selected member as an array
    lambda: _compressed(1, "bslz4", c.encode(c.BSLZ4, FRAME)[12:]),  # ADEiger strips the chunk header
    lambda: _compressed(1, "bslz4", c.encode(c.BSLZ4, FRAME)),
    lambda: _compressed(1, "lz4hdf5", c.encode(c.LZ4, FRAME)),
    lambda: _compressed(1, "lz4", c.encode(c.LZ4_BLOCK, FRAME)),
])
def test_ntndarray_frames_land_exactly(make):
    ring = FrameRing(4, (H, W), np.uint16)
    src = PvaSource("SIM:Pva1:Image", frame_shape=(H, W), dtype=np.uint16)
    src.attach(ring)
    src.handle(make())
    b = ring.take(1, timeout=0)
    np.testing.assert_array_equal(ring.slab[b.slots[0]], FRAME)
    assert b.frame_ids[0] == 0 and b.meta["t_detector"][0] == pytest.approx(1_700_000_000.5)


def test_unique_id_restart_begins_a_new_series():
    ring = FrameRing(8, (H, W), np.uint16)
    src = PvaSource("SIM:Pva1:Image", frame_shape=(H, W), dtype=np.uint16)
    src.attach(ring)
    for uid in (1, 2, 3, 1, 2):
        src.handle(_record(uid, FRAME.reshape(-1)))
    first, second = ring.take(8, timeout=0), ring.take(8, timeout=0)
    assert list(first.frame_ids) == [0, 1, 2] and first.end_series == 0
    assert list(second.frame_ids) == [0, 1] and set(second.meta["series_id"]) == {1}


@pytest.mark.parametrize("rec, kind", [
    (_record(1, FRAME.reshape(-1)[:-1]), "wrong_size"),
    (_compressed(1, "jpeg", b"\xff\xd8"), "unsupported_encoding"),
    ({"value": [1, 2]}, "garbage"),
    ({**_record(1, FRAME.reshape(-1)), "dimension": [{"size": W}, {"size": H}, {"size": 3}]}, "wrong_size"),
])
def test_malformed_ntndarrays_are_named(rec, kind):
    with pytest.raises(MessageError) as err:
        ntnd_frame(rec)
    assert err.value.kind == kind


@pytest.mark.skipif(any(importlib.util.find_spec(m) for m in ("p4p", "pvaccess")),
                    reason="a PVA library is installed here")
def test_probe_names_the_missing_library_and_the_fix():
    with pytest.raises(SourceUnavailable) as err:
        PvaSource.probe()
    assert "p4p" in str(err.value) and "pip install" in err.value.fix
