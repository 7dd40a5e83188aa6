"""Codecs of DECTRIS payloads: bit-exact decoding by every implementation, the chunk header, safe failure."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from edgeptycho.stream import codecs as c

pytest.importorskip("lz4")


def _frame(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    f = rng.poisson(0.5, shape).astype(dtype)
    f[shape[0] // 2, :: 7] = np.iinfo(dtype).max  # saturated / gap pixels, as DECTRIS marks them
    return f


@pytest.fixture(autouse=True)
def _default_backends():
    yield
    for codec in c.CODECS:
        c.use(codec, None)


@pytest.mark.parametrize("codec", c.CODECS)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
def test_every_implementation_decodes_bit_exact(codec, dtype):
    # 514 x 1030 leaves 4 elements outside the last 8-element group: the raw tail of bslz4.
    frame = _frame((514, 1030), dtype)
    payload = c.encode(codec, frame)
    for name in c.available(codec):
        c.use(codec, name)
        out = np.zeros_like(frame)
        copies = c.decode_into(codec, memoryview(payload), out)
        np.testing.assert_array_equal(out, frame, err_msg=f"{codec} via {name}")
        assert copies in (0, 1)


def test_preferred_bslz4_decoder_writes_straight_into_the_slot():
    if "dectris-ctypes" not in c.available(c.BSLZ4):
        pytest.skip("dectris-compression not installed")
    frame = _frame((256, 256), np.uint32)
    out = np.zeros_like(frame)
    assert c.decode_into(c.BSLZ4, c.encode(c.BSLZ4, frame), out) == 0
    np.testing.assert_array_equal(out, frame)


def test_chunk_header_matches_dectris_bytes():
    # A 16-bit 1030x514 frame: uncompressed size 1 058 840 bytes, 8192-byte blocks, big-endian.
    payload = c.encode(c.BSLZ4, np.zeros((514, 1030), np.uint16))
    assert payload[:12] == bytes.fromhex("0000000000102818 00002000".replace(" ", ""))
    assert c.header(payload) == (1058840, 8192)


def test_pure_bitshuffle_matches_the_bitshuffle_library():
    bitshuffle = pytest.importorskip("bitshuffle")
    for dtype in (np.uint8, np.uint16, np.uint32):
        block = _frame((64, 128), dtype).reshape(-1)[: c.BLOCK_BYTES // np.dtype(dtype).itemsize]  # one block
        ours = c.bitshuffle_block(block.view(np.uint8), block.itemsize)
        np.testing.assert_array_equal(ours, bitshuffle.bitshuffle(block).view(np.uint8))
        np.testing.assert_array_equal(c.bitunshuffle_block(ours, block.itemsize), block.view(np.uint8))


def test_bslz4_chunk_equals_hdf5_bitshuffle_filter_chunk(tmp_path):
    """An HDF5 bitshuffle-LZ4 chunk (filter 32008) is the same chunk a DECTRIS detector streams."""
    h5py = pytest.importorskip("h5py")
    hdf5plugin = pytest.importorskip("hdf5plugin")
    frame = _frame((514, 1030), np.uint16)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset("d", data=frame[None], chunks=(1, 514, 1030), **hdf5plugin.Bitshuffle(cname="lz4"))
    with h5py.File(tmp_path / "f.h5", "r") as f:
        _, chunk = f["d"].id.read_direct_chunk((0, 0, 0))
    out = np.zeros_like(frame)
    c.decode_into(c.BSLZ4, chunk, out)
    np.testing.assert_array_equal(out, frame)
    if c._bitshuffle is not None:  # same LZ4 library → byte-identical chunk
        assert c.encode(c.BSLZ4, frame) == chunk


@pytest.mark.parametrize("codec", [c.BSLZ4, c.LZ4, c.LZ4_BLOCK])
def test_corrupt_payloads_raise_codec_errors_and_stay_inside_the_destination(codec):
    frame = _frame((64, 64), np.uint16)
    good = c.encode(codec, frame)
    cases = {"truncated": good[: len(good) // 2], "flipped": bytes(b ^ 0x5A for b in good[:40]) + good[40:],
             "garbage": np.random.default_rng(1).bytes(len(good)), "empty": b""}
    if codec != c.LZ4_BLOCK:
        cases["too big"] = struct.pack(">QI", frame.nbytes * 2, 8192) + good[12:]
        cases["zero block"] = good[:8] + b"\0\0\0\0" + good[12:]
    for name in c.available(codec):
        c.use(codec, name)
        for label, payload in cases.items():
            guard = np.full(frame.size + 64, 0xABCD, np.uint16)  # the slot plus a guard band after it
            out = guard[: frame.size].reshape(frame.shape)
            try:
                c.decode_into(codec, payload, out)
            except c.CodecError as exc:
                assert exc.kind in ("bad_compression", "wrong_size"), (name, label, exc.kind)
            else:  # only a bit flip can still decode (to wrong pixels: no checksum in the format)
                assert label == "flipped", (name, label)
            assert np.all(guard[frame.size:] == 0xABCD), f"{name} wrote past the slot on {label}"


def test_wrong_destination_size_and_dtype_are_reported_by_kind():
    frame = _frame((32, 32), np.uint32)
    payload = c.encode(c.BSLZ4, frame)
    with pytest.raises(c.CodecError) as err:
        c.decode_into(c.BSLZ4, payload, np.zeros((32, 16), np.uint32))
    assert err.value.kind == "wrong_size"
    with pytest.raises(c.CodecError) as err:
        c.decode_into(c.BSLZ4, payload, np.zeros((32, 32), np.uint32), elem_size=2)
    assert err.value.kind == "wrong_dtype"
    with pytest.raises(c.CodecError) as err:
        c.decode_into(c.RAW, frame.tobytes()[:-4], np.zeros_like(frame))
    assert err.value.kind == "wrong_size"


@pytest.mark.parametrize("encoding, expected", [
    ("bs32-lz4<", (c.BSLZ4, 4)), ("bs16-lz4<", (c.BSLZ4, 2)), ("bs8-lz4<", (c.BSLZ4, 1)),
    ("bs16lz4<", (c.BSLZ4, 2)), ("lz4<", (c.LZ4_BLOCK, None)), ("<", (c.RAW, None)), ("", (c.RAW, None)),
])
def test_v1_encoding_grammar(encoding, expected):
    assert c.parse_v1_encoding(encoding) == expected


@pytest.mark.parametrize("encoding", ["bs12-lz4<", "bs16<", "zstd<", "bs32-lz4>", ">", "lz5<"])
def test_v1_encodings_we_cannot_decode_are_named(encoding):
    with pytest.raises(c.CodecError) as err:
        c.parse_v1_encoding(encoding)
    assert err.value.kind == "unsupported_encoding"
