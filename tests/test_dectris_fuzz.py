"""Hypothesis drives both receivers with mutated valid messages and random bytes: nothing crashes, leaks a slot
or spoils the next good frame."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeptycho.stream import codecs as c
from edgeptycho.stream.detector_sim import (
    DetectorSimulator,
    v1_end,
    v1_header,
    v1_image,
    v2_array,
    v2_message,
)
from edgeptycho.stream.ring import FrameRing
from edgeptycho.stream.sources.dectris_common import FATAL, NOTES, MessageError
from edgeptycho.stream.sources.dectris_v1 import DectrisV1Source
from edgeptycho.stream.sources.dectris_v2 import DectrisV2Source

pytest.importorskip("cbor2")
pytest.importorskip("lz4")
H, W = 6, 10
FRAME = np.random.default_rng(9).integers(0, 40, (H, W)).astype(np.uint16)
GOOD = np.random.default_rng(10).integers(0, 40, (H, W)).astype(np.uint16)
# DECTRIS_FUZZ_EXAMPLES=5000 for a long soak; the default keeps the suite quick.
FUZZ = settings(max_examples=int(os.environ.get("DECTRIS_FUZZ_EXAMPLES", "150")), deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check_survived(cls, messages, good_message):
    """Feed messages as the receive loop does, then a good frame: it must land exactly, nothing leaks."""
    ring = FrameRing(4, (H, W), np.uint16, policy="latest")
    src = cls(frame_shape=(H, W), dtype=np.uint16)
    src.attach(ring)
    for m in [*messages, good_message]:
        try:
            src.handle(m)
        except MessageError as exc:
            assert exc.kind in FATAL, exc.kind
            src._issue(exc.kind, str(exc))
    assert set(src.issues.counts) <= set(FATAL) | set(NOTES)
    assert 1 not in ring._state  # no slot left half-written (a bad frame's slot is given back)
    assert ring.received == src.stats.received
    last = None
    while True:
        b = ring.take(8, timeout=0)
        if len(b):
            last = (int(b.frame_ids[-1]), ring.slab[b.slots[-1]].copy())
        ring.release(b.slots)
        if not len(b) and b.end_series is None:
            break
    assert last is not None and last[0] == 1_000_000
    np.testing.assert_array_equal(last[1], GOOD)


# ---- stream v1 -------------------------------------------------------------------------------------------

def _v1_messages():
    arrays = {"mask": np.zeros((H, W), np.uint32), "flatfield": np.ones((H, W), np.float32),
              "countrate_table": np.ones((4, 2), np.float32)}
    msgs = [v1_header(1, "all", {"nimages": 3}, arrays), v1_end(1)]
    for i, codec in enumerate((c.BSLZ4, c.LZ4_BLOCK, c.RAW)):
        msgs.append(v1_image(1, i, c.encode(codec, FRAME), (H, W), np.uint16, c.v1_encoding(codec, np.uint16)))
    return [[bytes(p) for p in m] for m in msgs]


V1 = _v1_messages()
V1_GOOD = v1_image(77, 1_000_000, c.encode(c.BSLZ4, GOOD), (H, W), np.uint16, "bs16-lz4<")
JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                    max_size=3), max_leaves=6)


@st.composite
def v1_mutant(draw):
    parts = list(draw(st.sampled_from(V1)))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["drop", "truncate", "flip", "random", "insert", "json"]))
        i = draw(st.integers(0, max(len(parts) - 1, 0)))
        if not parts:
            parts = [draw(st.binary(max_size=64))]
        elif op == "drop":
            del parts[i]
        elif op == "truncate":
            parts[i] = parts[i][: draw(st.integers(0, len(parts[i])))]
        elif op == "flip" and parts[i]:
            j = draw(st.integers(0, len(parts[i]) - 1))
            parts[i] = parts[i][:j] + bytes([parts[i][j] ^ draw(st.integers(1, 255))]) + parts[i][j + 1:]
        elif op == "random":
            parts[i] = draw(st.binary(max_size=200))
        elif op == "insert":
            parts.insert(i, draw(st.binary(max_size=64)))
        elif op == "json":
            try:
                d = json.loads(parts[i])
            except ValueError:
                continue
            if isinstance(d, dict) and d:
                key = draw(st.sampled_from(sorted(d) + ["shape", "type", "encoding", "size", "frame", "series"]))
                d[key] = draw(JSONISH)
                parts[i] = json.dumps(d, allow_nan=True).encode()
    return parts


@FUZZ
@given(st.lists(v1_mutant(), min_size=1, max_size=3))
def test_v1_survives_mutated_messages(messages):
    _check_survived(DectrisV1Source, messages, V1_GOOD)


@FUZZ
@given(st.lists(st.lists(st.binary(max_size=300), min_size=0, max_size=5), min_size=1, max_size=3))
def test_v1_survives_random_bytes(messages):
    _check_survived(DectrisV1Source, messages, V1_GOOD)


# ---- stream v2 -------------------------------------------------------------------------------------------

def _v2_messages():
    sim = DetectorSimulator(FRAME[None], protocol="stream2", endpoint="tcp://127.0.0.1:0",
                            channels=("threshold_1", "threshold_2"), md5=False)
    msgs = [sim._v2_start("U"), v2_message({"type": "end", "series_id": 1, "series_unique_id": "U"})]
    for codec in (c.BSLZ4, c.LZ4, c.RAW):
        sim.codec = codec
        sim._payloads = [[sim._encode(FRAME), sim._encode(FRAME // 2)]]
        msgs.append(sim._image(0, "U", None))
    return msgs


V2 = _v2_messages()
V2_GOOD = v2_message({"type": "image", "series_id": 77, "image_id": 1_000_000,
                      "data": {"threshold_1": v2_array(c.encode(c.BSLZ4, GOOD), (H, W), np.uint16, c.BSLZ4)}})


@st.composite
def v2_mutant(draw):
    msg = bytearray(draw(st.sampled_from(V2)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        j = draw(st.integers(0, max(len(msg) - 1, 0)))
        if op == "flip" and msg:
            msg[j] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del msg[j:]
        elif op == "insert":
            msg[j:j] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del msg[j:j + draw(st.integers(1, 16))]
    return bytes(msg)


@st.composite
def v2_field_mutant(draw):
    """Valid CBOR with hostile field values: wrong types, absurd ids, odd tags."""
    import cbor2

    fields = dict(cbor2.loads(draw(st.sampled_from(V2))))
    key = draw(st.sampled_from(sorted(fields) + ["data", "image_id", "series_id", "type", "pixel_mask"]))
    tagged = st.builds(cbor2.CBORTag, st.sampled_from([0, 1, 2, 5, 28, 29, 30, 35, 40, 56500, 64, 69, 70, 85]),
                       JSONISH | st.binary(max_size=40))
    fields[key] = draw(JSONISH | tagged | st.dictionaries(st.sampled_from(["threshold_1", "x"]), tagged, max_size=2))
    return v2_message(fields)


@FUZZ
@given(st.lists(v2_mutant() | v2_field_mutant(), min_size=1, max_size=3))
def test_v2_survives_mutated_messages(messages):
    _check_survived(DectrisV2Source, messages, V2_GOOD)


@FUZZ
@given(st.lists(st.binary(max_size=400), min_size=1, max_size=3))
def test_v2_survives_random_bytes(messages):
    _check_survived(DectrisV2Source, messages, V2_GOOD)
