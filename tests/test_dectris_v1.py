"""SIMPLON stream v1 receiver: header detail levels, [x, y] shapes, and every kind of malformed input survived."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from edgeptycho.stream import codecs as c
from edgeptycho.stream.detector_sim import v1_end, v1_header, v1_image
from edgeptycho.stream.positions import PositionTable
from edgeptycho.stream.ring import FrameRing
from edgeptycho.stream.sources.dectris_v1 import DectrisV1Source

pytest.importorskip("lz4")
H, W = 6, 10  # deliberately not square: V1 writes shape as [width, height]


def _frames(n, dtype=np.uint16):
    return np.random.default_rng(3).integers(0, 50, (n, H, W)).astype(dtype)


def _source(dtype=np.uint16, **kw):
    ring = FrameRing(8, (H, W), dtype, policy="latest")
    src = DectrisV1Source("tcp://127.0.0.1:1", frame_shape=(H, W), dtype=dtype, **kw)
    src.attach(ring)
    return src, ring


def _image(frame_id, frame, codec=c.BSLZ4, series=1, **kw):
    return v1_image(series, frame_id, c.encode(codec, frame), frame.shape, frame.dtype,
                    c.v1_encoding(codec, frame.dtype), **kw)


def _drain(ring):
    got = {}
    while True:
        b = ring.take(16, timeout=0)
        for s, fid in zip(b.slots, b.frame_ids, strict=True):
            got[int(fid)] = ring.slab[s].copy()
        ring.release(b.slots)
        if not len(b) and b.end_series is None:
            return got


def _arrays():
    return {"mask": (np.arange(H * W).reshape(H, W) % 5 == 0).astype(np.uint32),
            "flatfield": np.linspace(0.9, 1.1, H * W).reshape(H, W).astype(np.float32),
            "countrate_table": np.arange(2000, dtype=np.float32).reshape(1000, 2)}


def test_header_all_exposes_mask_flatfield_and_countrate_in_numpy_orientation():
    src, _ = _source()
    arrays = _arrays()
    config = {"x_pixels_in_detector": W, "y_pixels_in_detector": H, "nimages": 3, "ntrigger": 1}
    src.handle_safely(v1_header(7, "all", config, arrays, appendix=b'{"user": 1}'))
    assert src.series_id == 7 and src.header_event.is_set()
    np.testing.assert_array_equal(src.mask, arrays["mask"])
    np.testing.assert_array_equal(src.flatfield, arrays["flatfield"])
    assert src.countrate_table.shape == (1000, 2)
    assert src.detector_config["x_pixels_in_detector"] == W and src.header_appendix == b'{"user": 1}'


@pytest.mark.parametrize("detail", ["basic", "none"])
def test_lower_header_details_carry_no_arrays(detail):
    src, _ = _source()
    src.handle_safely(v1_header(2, detail, {"nimages": 1}))
    assert src.mask is None and src.flatfield is None and src.series_id == 2
    assert (src.detector_config.get("nimages") == 1) == (detail == "basic")


@pytest.mark.parametrize("codec", [c.BSLZ4, c.LZ4_BLOCK, c.RAW])
def test_images_land_with_ids_series_and_positions(codec):
    frames = _frames(3)
    positions = PositionTable.from_array(np.array([[1e-6, 2e-6], [3e-6, 4e-6], [5e-6, 6e-6]]), pixel_m=1e-8)
    src, ring = _source(positions=positions)
    src.handle_safely(v1_header(4, "basic", {}))
    for i, f in enumerate(frames):
        src.handle_safely(_image(i, f, codec, series=4))
    src.handle_safely(v1_end(4))
    batch = ring.take(8, timeout=0)
    assert batch.end_series == 4 and list(batch.frame_ids) == [0, 1, 2]
    for s, i in zip(batch.slots, range(3), strict=True):
        np.testing.assert_array_equal(ring.slab[s], frames[i])
    np.testing.assert_allclose(batch.meta["position_m"][1], [3e-6, 4e-6])
    np.testing.assert_allclose(batch.meta["position_px"][2], [500, 600])
    assert set(batch.meta["series_id"]) == {4} and src.series_done == 1 and src.stats.malformed == 0


def test_narrow_detector_pixels_widen_into_wider_slots_with_one_counted_copy():
    frames = _frames(1, np.uint16)
    ring = FrameRing(4, (H, W), np.uint32)
    src = DectrisV1Source(frame_shape=(H, W), dtype=np.uint32)
    src.attach(ring)
    src.handle_safely(_image(0, frames[0]))
    b = ring.take(1, timeout=0)
    np.testing.assert_array_equal(ring.slab[b.slots[0]], frames[0])
    assert src.landing == {"direct": 0, "copied": 1}


def test_md5_hash_is_checked_when_asked():
    f = _frames(1)[0]
    payload = c.encode(c.BSLZ4, f)
    src, ring = _source(verify_hash=True)
    good = v1_image(1, 0, payload, f.shape, f.dtype, "bs16-lz4<", md5=hashlib.md5(payload).hexdigest())
    bad = v1_image(1, 1, payload, f.shape, f.dtype, "bs16-lz4<", md5="0" * 32)
    src.handle_safely(good)
    src.handle_safely(bad)
    assert list(_drain(ring)) == [0] and src.issues.counts == {"missing_header": 1, "hash_mismatch": 1}


def _malformed_cases(frame):
    payload = c.encode(c.BSLZ4, frame)
    img = _image(1, frame)
    desc = json.loads(img[1])

    def with_desc(**changes):
        return [img[0], json.dumps({**desc, **changes}).encode(), *img[2:]]

    return {
        "unknown_type": [b'{"htype": "dfoo-1.0", "series": 1}'],
        "garbage": [b"\x00\xffnot json at all"],
        "truncated": [img[0], img[1], payload[: len(payload) // 2], img[3]],
        "wrong_size": with_desc(shape=[W + 2, H]),
        "wrong_dtype": with_desc(type="float32"),
        "bad_compression": [img[0], img[1], payload[:12] + bytes(len(payload) - 12), img[3]],
        "unsupported_encoding": with_desc(encoding="bs16-zstd<"),
    }


def test_each_malformed_kind_is_counted_and_never_touches_neighbouring_frames():
    frames = _frames(3)
    src, ring = _source()
    src.handle_safely(v1_header(1, "none", {}))
    src.handle_safely(_image(0, frames[0]))
    for kind, parts in _malformed_cases(frames[1]).items():
        before = src.issues.counts.get(kind, 0)
        src.handle_safely(parts)
        assert src.issues.counts.get(kind, 0) == before + 1, kind
    src.handle_safely(_image(1, frames[1]))  # the id the bad messages carried is still free
    src.handle_safely(_image(2, frames[2]))
    got = _drain(ring)
    assert sorted(got) == [0, 1, 2]
    for i in range(3):
        np.testing.assert_array_equal(got[i], frames[i])
    assert src.stats.malformed == 7 and src.stats.received == 3
    assert 1 not in ring._state  # no slot left half-written


def test_repeated_out_of_order_and_restarted_series_are_survived():
    frames = _frames(4)
    src, ring = _source()
    src.handle_safely(v1_header(1, "none", {}))
    for i in (0, 2, 1, 2):  # 1 arrives late (kept), 2 repeats (dropped)
        src.handle_safely(_image(i, frames[i]))
    src.handle_safely(v1_header(2, "none", {}))  # series 1 never ended
    src.handle_safely(_image(0, frames[3], series=2))
    src.handle_safely(v1_end(9))  # an end for a series that is not open
    counts = src.issues.counts
    assert counts["out_of_order"] == 1 and counts["repeated_frame"] == 1
    assert counts["series_restarted"] == 1 and counts["unexpected_end"] == 1
    first = ring.take(8, timeout=0)
    assert list(first.frame_ids) == [0, 2, 1] and first.end_series == 1
    second = ring.take(8, timeout=0)
    assert list(second.frame_ids) == [0] and second.meta["series_id"][0] == 2
    assert second.end_series is None  # the stray end did not close series 2
    np.testing.assert_array_equal(ring.slab[second.slots[0]], frames[3])


def test_decode_pool_counts_bad_frames_and_keeps_good_ones():
    frames = _frames(4)
    src, ring = _source(decode_threads=2)
    src.handle_safely(v1_header(1, "none", {}))
    for i, f in enumerate(frames):
        parts = _image(i, f)
        if i == 2:  # corrupt blocks behind a valid header: only the decoder can tell
            parts[2] = parts[2][:12] + bytes(len(parts[2]) - 12)
        src.handle_safely(parts)
    src.handle_safely(v1_end(1))
    src.detach()
    got = _drain(ring)
    assert sorted(got) == [0, 1, 3] and src.issues.counts == {"bad_compression": 1}
    for i in (0, 1, 3):
        np.testing.assert_array_equal(got[i], frames[i])
    assert 1 not in ring._state
