"""SIMPLON stream v2 receiver: CBOR framing and tags as DECTRIS writes them, safe decoding, malformed input."""

from __future__ import annotations

import math
import struct
from datetime import datetime

import numpy as np
import pytest

from edgeptycho.stream import codecs as c
from edgeptycho.stream.detector_sim import DetectorSimulator, v2_array, v2_message
from edgeptycho.stream.ring import FrameRing
from edgeptycho.stream.sources.dectris_v2 import DectrisV2Source, loads

cbor2 = pytest.importorskip("cbor2")
pytest.importorskip("lz4")
CBORTag = cbor2.CBORTag
H, W = 6, 10


def _frames(n, dtype=np.uint16):
    return np.random.default_rng(5).integers(0, 60, (n, H, W)).astype(dtype)


def _source(dtype=np.uint16, **kw):
    ring = FrameRing(8, (H, W), dtype, policy="latest")
    src = DectrisV2Source(frame_shape=(H, W), dtype=dtype, **kw)
    src.attach(ring)
    return src, ring


def _sim(frames, **kw):
    return DetectorSimulator(frames, protocol="stream2", endpoint="tcp://127.0.0.1:0",
                             channels=("threshold_1", "threshold_2", "difference"), **kw)


def _image(i, arrays, codec=c.BSLZ4, series=1, **extra):
    data = {ch: v2_array(c.encode(codec, a), a.shape, a.dtype, codec) for ch, a in arrays.items()}
    fields = {"type": "image", "series_id": series, "series_unique_id": "U", "image_id": i,
              "real_time": CBORTag(30, [1, 1000]), "series_date": CBORTag(0, "2023-02-10T15:49:05.281+01:00"),
              "start_time": CBORTag(30, [i, 1000]), "stop_time": CBORTag(30, [i + 1, 1000]), "data": data}
    fields.update(extra)
    return v2_message(fields)


def test_image_bytes_follow_the_dectris_layout():
    """Tag 40, dims [514, 1030], tag 69, tag 56500 ["bslz4", 2, <12-byte header + blocks>], after 55799."""
    frame = np.random.default_rng(0).poisson(0.5, (514, 1030)).astype(np.uint16)  # > 64 kB compressed
    msg = _image(0, {"threshold_1": frame})
    assert msg.startswith(bytes.fromhex("d9d9f7"))
    assert cbor2.loads(msg)["type"] == "image"  # first key is "type"
    assert msg.index(b"\xa9\x64type") < 8
    prefix = bytes.fromhex("d828 82 82 190202 190406 d845 d9dcb4 83 65") + b"bslz4" + bytes.fromhex("02 5a")
    at = msg.index(prefix) + len(prefix)
    (length,) = struct.unpack(">I", msg[at:at + 4])
    assert msg[at + 4:at + 16] == bytes.fromhex("0000000000102818 00002000".replace(" ", ""))
    assert length == len(c.encode(c.BSLZ4, frame))


def test_start_message_gives_masks_flatfields_countrate_and_config_per_channel():
    frames = _frames(2)
    mask = np.zeros((H, W), np.uint32)
    mask[2, 3] = 1
    sim = _sim(frames, mask=mask, flatfield=np.full((H, W), 1.5, np.float32))
    src, _ = _source()
    src.handle_safely(sim._v2_start("ULID"))
    assert src.series_id == 1 and src.series_unique_id == "ULID"
    assert set(src.masks) == {"threshold_1", "threshold_2", "difference"}
    np.testing.assert_array_equal(src.mask, mask)
    assert src.flatfield.dtype == np.float32 and np.all(src.flatfield == 1.5)
    assert src.countrate_table.shape == (1000,)
    cfg = src.detector_config
    assert cfg["image_size_x"] == W and cfg["channels"] == ["threshold_1", "threshold_2", "difference"]
    assert datetime.fromisoformat(cfg["arm_date"]).tzinfo is not None
    assert cfg["goniometer"]["omega"] == {"increment": 0.0, "start": 0.0}


def test_channel_choice_rationals_and_datetime_reach_the_ring():
    t1, t2 = _frames(2)
    src, ring = _source(channel="threshold_2")
    src.handle_safely(_image(3, {"threshold_1": t1, "threshold_2": t2}, c.LZ4))
    b = ring.take(1, timeout=0)
    np.testing.assert_array_equal(ring.slab[b.slots[0]], t2)
    t0 = datetime.fromisoformat("2023-02-10T15:49:05.281+01:00").timestamp()
    assert b.meta["t_detector"][0] == pytest.approx(t0 + 0.003)
    assert b.frame_ids[0] == 3


def test_compressed_pixel_mask_in_the_start_message():
    mask = (np.arange(H * W).reshape(H, W) % 7 == 0).astype(np.uint32)
    start = v2_message({"type": "start", "series_id": 2, "channels": ["threshold_1"],
                        "pixel_mask": {"threshold_1": v2_array(c.encode(c.BSLZ4, mask), (H, W), np.uint32, c.BSLZ4)}})
    src, _ = _source()
    src.handle_safely(start)
    np.testing.assert_array_equal(src.mask, mask)


def test_hostile_tags_stay_inert():
    """Regex, MIME, bigfloat, shared references, bignums: decoded as inert tags, never evaluated."""
    evil = {"type": "start", "series_id": 1, "user_data": {
        "re": CBORTag(35, "(a+)+$"), "mime": CBORTag(36, "Content-Type: text/plain\n\nx"),
        "bigfloat": CBORTag(5, [10 ** 9, 3]), "shared": CBORTag(28, [1]), "ref": CBORTag(29, 0),
        "bignum": CBORTag(2, b"\xff" * 64), "set": CBORTag(258, [1, 2]), "uuid": CBORTag(37, b"x"),
        "bad_rational": CBORTag(30, [1, 0]), "bad_date": CBORTag(0, "not a date"), "epoch": CBORTag(1, 1e300)}}
    msg = loads(v2_message(evil))
    ud = msg["user_data"]
    for key in ("re", "mime", "bigfloat", "shared", "ref", "bignum", "set", "uuid", "bad_rational"):
        assert isinstance(ud[key], CBORTag), key
    assert ud["bad_date"] == "not a date" and ud["epoch"] == 1e300
    src, _ = _source()
    src.handle_safely(v2_message(evil))
    assert src.series_id == 1 and src.stats.malformed == 0


def test_message_without_self_describe_tag_is_accepted_and_noted():
    src, ring = _source()
    body = cbor2.dumps({"type": "image", "series_id": 1, "image_id": 0,
                        "data": {"threshold_1": v2_array(_frames(1)[0].tobytes(), (H, W), np.uint16, c.RAW)}})
    src.handle_safely(body)
    assert src.issues.counts["no_cbor_magic"] == 1 and ring.take(1, timeout=0).frame_ids[0] == 0


def _mutations(frame):
    ok = {"threshold_1": frame}

    def with_array(array):
        return _image(1, ok) if array is None else v2_message({"type": "image", "series_id": 1, "image_id": 1,
                                                              "data": {"threshold_1": array}})
    payload = c.encode(c.BSLZ4, frame)
    return {
        "garbage": b"\xd9\xd9\xf7\xff\x00garbage",
        "unknown_type": v2_message({"type": "calibration", "series_id": 1}),
        "truncated": with_array(CBORTag(40, [[H, W], CBORTag(69, frame.tobytes()[:-10])])),
        "wrong_size": with_array(CBORTag(40, [[H, W + 1], CBORTag(69, CBORTag(56500, ["bslz4", 2, payload]))])),
        "wrong_dtype": with_array(CBORTag(40, [[H, W], CBORTag(70, CBORTag(56500, ["bslz4", 2, payload]))])),
        "bad_compression": with_array(CBORTag(40, [[H, W], CBORTag(69, CBORTag(56500, ["bslz4", 2,
                                                                                      payload[:20]]))])),
        "unsupported_encoding": with_array(CBORTag(40, [[H, W], CBORTag(69, CBORTag(56500, ["zstd", 2, b"x"]))])),
        "missing_channel": v2_message({"type": "image", "series_id": 1, "image_id": 1,
                                       "data": {"threshold_2": v2_array(frame.tobytes(), (H, W), np.uint16, c.RAW)}}),
    }


def test_each_malformed_kind_is_counted_and_neighbours_stay_intact():
    frames = _frames(3)
    src, ring = _source(channel="threshold_1")
    src.handle_safely(_image(0, {"threshold_1": frames[0]}))
    cases = _mutations(frames[1])
    for kind, msg in cases.items():
        before = src.issues.counts.get(kind, 0)
        src.handle_safely(msg)
        assert src.issues.counts.get(kind, 0) == before + 1, kind
    src.handle_safely(_image(1, {"threshold_1": frames[1]}))
    src.handle_safely(_image(2, {"threshold_1": frames[2]}))
    src.handle_safely(_image(2, {"threshold_1": frames[0]}))  # repeated id: dropped, slot not committed
    b = ring.take(8, timeout=0)
    assert list(b.frame_ids) == [0, 1, 2]
    for s, f in zip(b.slots, frames, strict=True):
        np.testing.assert_array_equal(ring.slab[s], f)
    assert src.issues.counts["repeated_frame"] == 1
    assert src.stats.malformed == len(cases) + 1 and 1 not in ring._state


def test_start_without_end_closes_the_previous_series():
    src, ring = _source()
    f = _frames(1)[0]
    src.handle_safely(v2_message({"type": "start", "series_id": 1}))
    src.handle_safely(_image(0, {"threshold_1": f}, series=1))
    src.handle_safely(v2_message({"type": "start", "series_id": 2}))
    src.handle_safely(_image(0, {"threshold_1": f}, series=2))
    src.handle_safely(v2_message({"type": "end", "series_id": 2}))
    first, second = ring.take(8, timeout=0), ring.take(8, timeout=0)
    assert first.end_series == 1 and second.end_series == 2 and src.series_done == 1
    assert src.issues.counts == {"series_restarted": 1}
    assert math.isfinite(second.meta["t_detector"][0])
