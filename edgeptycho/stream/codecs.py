"""Decode (and encode) DECTRIS pixel payloads — bitshuffle-LZ4, LZ4, raw — straight into a caller's buffer."""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Callable
from typing import Any

import numpy as np

BSLZ4 = "bslz4"          # bitshuffle + LZ4 with the 12-byte header (V1 bsNN-lz4<, V2 56500 "bslz4", HDF5 32008)
LZ4 = "lz4"              # LZ4 blocks with the same 12-byte header, HDF5 32004 framing (V2 56500 "lz4")
LZ4_BLOCK = "lz4-block"  # one bare LZ4 block, no header (V1 "lz4<")
RAW = "raw"              # uncompressed little-endian pixels
CODECS = (BSLZ4, LZ4, LZ4_BLOCK, RAW)
BLOCK_BYTES = 8192       # DECTRIS and the bitshuffle HDF5 filter: 8192-byte blocks for every element size
_HEADER = struct.Struct(">QI")


class CodecError(ValueError):
    """A payload cannot be decoded into the destination; `kind` names the failure for the counters."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


# --------------------------------------------------------------------------------------------------------
# Library discovery. Optional libraries are looked up once; every implementation is a function
# (src, out, elem_size) -> number of whole-frame copies it made (0 = decoded straight into `out`).

def _try_import(name: str) -> Any:
    try:
        return __import__(name, fromlist=["_"])
    except ImportError:
        return None


def _dectris_c() -> Any:
    """compression_decompress_buffer() of dectris-compression's extension, called through ctypes.

    The Python binding only returns new bytes; the C entry point (public API in compression.h) writes into
    any buffer with full bounds checks, so the frame lands in its ring slot with no copy.
    """
    mod = _try_import("dectris.compression")
    if mod is None:
        return None
    try:
        fn = ctypes.CDLL(mod.__file__).compression_decompress_buffer
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                   ctypes.c_size_t]
    return fn


def _lz4_c() -> Any:
    """LZ4_decompress_safe (bounds-checked) exported by the lz4 or dectris-compression extension."""
    for name in ("lz4.block._block", "dectris.compression"):
        mod = _try_import(name)
        if mod is None:
            continue
        try:
            fn = ctypes.CDLL(mod.__file__).LZ4_decompress_safe
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        return fn
    return None


_DECTRIS_C = _dectris_c()
_LZ4_C = _lz4_c()
def _import_bitshuffle() -> Any:
    """bitshuffle with a one-thread OpenMP pool (unless the user set OMP_NUM_THREADS).

    Its default of one thread per core fights the receive thread and the backend on a small edge box: a
    500k-pixel frame decoded 14-17x slower (6.7 vs 0.4 ms) on 2 cores. We parallelise across frames
    instead (every decoder releases the GIL). The wheel bundles its own libgomp, which reads the variable
    when bitshuffle is imported; it is restored afterwards so torch and others keep their own defaults.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return _try_import("bitshuffle")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        return _try_import("bitshuffle")
    finally:
        del os.environ["OMP_NUM_THREADS"]


_dectris = _try_import("dectris.compression")
_lz4block = _try_import("lz4.block")
_bitshuffle = _import_bitshuffle()
_COMPRESSION_BSLZ4, _COMPRESSION_LZ4 = 0, 1  # CompressionAlgorithm enum in compression.h


def _u8(src: Any) -> np.ndarray:
    return np.frombuffer(src, np.uint8)


def header(src: Any) -> tuple[int, int]:
    """(uncompressed bytes, block bytes) from the big-endian 12-byte chunk header."""
    if len(src) < 12:
        raise CodecError("bad_compression", f"compressed chunk of {len(src)} bytes is shorter than its header")
    return _HEADER.unpack_from(src, 0)


def _check_header(src: Any, out: np.ndarray, elem_size: int, codec: str) -> int:
    nbytes, block = header(src)
    if nbytes != out.nbytes:
        raise CodecError("wrong_size", f"{codec} header says {nbytes} bytes, the frame slot holds {out.nbytes}")
    if codec == BSLZ4 and (block == 0 or block % (8 * elem_size)):
        raise CodecError("bad_compression", f"bslz4 block size {block} B is not a multiple of 8 elements")
    if codec == LZ4 and block == 0 and nbytes:
        raise CodecError("bad_compression", "lz4 block size 0 in the chunk header")
    return block


# ---- bitshuffle in numpy (pure fallback, and the reference the C paths are tested against) -------------

def bitshuffle_block(data: np.ndarray, elem_size: int) -> np.ndarray:
    """Bit-transpose one block (uint8, n·elem_size bytes, n % 8 == 0): plane k holds bit k of every element."""
    n = data.size // elem_size
    bits = np.unpackbits(data.reshape(n, elem_size), axis=1, bitorder="little")  # (n, 8·es)
    return np.packbits(bits.T, axis=1, bitorder="little").reshape(-1)


def bitunshuffle_block(data: np.ndarray, elem_size: int) -> np.ndarray:
    """Inverse of bitshuffle_block."""
    planes = data.reshape(8 * elem_size, -1)
    bits = np.unpackbits(planes, axis=1, bitorder="little")  # (8·es, n)
    return np.packbits(bits.T, axis=1, bitorder="little").reshape(-1)


def _walk_blocks(src: Any, nbytes: int, block: int, tail_raw: int) -> list[tuple[int, int, int]]:
    """(src offset, compressed length, uncompressed length) of each framed block; validates all bounds."""
    out, pos, size = [], 12, len(src)
    full, last = divmod(nbytes - tail_raw, block)
    for ulen in [block] * full + ([last] if last else []):
        if pos + 4 > size:
            raise CodecError("bad_compression", "compressed chunk truncated inside a block header")
        (clen,) = struct.unpack_from(">I", src, pos)
        pos += 4
        if clen > size - pos:
            raise CodecError("bad_compression", f"block of {clen} B runs past the {size}-B chunk")
        out.append((pos, clen, ulen))
        pos += clen
    if size - pos != tail_raw:
        raise CodecError("bad_compression", f"chunk has {size - pos} trailing bytes, expected {tail_raw}")
    return out


def _lz4_raw_block(src: Any, off: int, clen: int, ulen: int) -> bytes:
    if _lz4block is None:
        raise CodecError("unsupported_encoding", "LZ4 payloads need the 'lz4' package (pip install lz4)")
    try:
        data = _lz4block.decompress(memoryview(src)[off:off + clen], uncompressed_size=ulen)
    except Exception as exc:  # lz4.block.LZ4BlockError
        raise CodecError("bad_compression", f"LZ4 block does not decode: {exc}") from None
    if len(data) != ulen:
        raise CodecError("bad_compression", f"LZ4 block gave {len(data)} bytes, expected {ulen}")
    return data


# ---- decoders -----------------------------------------------------------------------------------------

def _dectris_c_into(algorithm: int) -> Callable[[Any, np.ndarray, int], int]:
    def run(src: Any, out: np.ndarray, elem_size: int) -> int:
        s = _u8(src)
        got = _DECTRIS_C(algorithm, out.ctypes.data, out.nbytes, s.ctypes.data, s.size, elem_size)
        if got != out.nbytes:
            raise CodecError("bad_compression", "compressed chunk is corrupt (dectris-compression rejected it)")
        return 0
    return run


def _dectris_py(algorithm: str) -> Callable[[Any, np.ndarray, int], int]:
    def run(src: Any, out: np.ndarray, elem_size: int) -> int:
        try:
            data = _dectris.decompress(bytes(src), algorithm, elem_size=elem_size)
        except Exception as exc:  # dectris.compression raises RuntimeError/ValueError on corrupt input
            raise CodecError("bad_compression", f"compressed chunk is corrupt: {exc}") from None
        if len(data) != out.nbytes:
            raise CodecError("wrong_size", f"decoded {len(data)} bytes, slot holds {out.nbytes}")
        out.reshape(-1).view(np.uint8)[:] = _u8(data)
        return 1
    return run


def _bslz4_bitshuffle(src: Any, out: np.ndarray, elem_size: int) -> int:
    nbytes, block = header(src)
    # bitshuffle's C decoder trusts the block lengths; walking them first keeps it inside the buffer.
    _walk_blocks(src, nbytes, block, nbytes % (8 * elem_size))
    n = nbytes // elem_size
    try:
        arr = _bitshuffle.decompress_lz4(_u8(src)[12:], (n,), np.dtype(f"u{elem_size}"), block // elem_size)
    except Exception as exc:
        raise CodecError("bad_compression", f"bitshuffle rejected the chunk: {exc}") from None
    out.reshape(-1).view(np.uint8)[:] = arr.view(np.uint8)
    return 1


def _bslz4_numpy(src: Any, out: np.ndarray, elem_size: int) -> int:
    nbytes, block = header(src)
    tail = nbytes % (8 * elem_size)
    dst = out.reshape(-1).view(np.uint8)
    pos = 0
    for off, clen, ulen in _walk_blocks(src, nbytes, block, tail):
        dst[pos:pos + ulen] = bitunshuffle_block(_u8(_lz4_raw_block(src, off, clen, ulen)), elem_size)
        pos += ulen
    if tail:
        dst[pos:] = _u8(src)[len(src) - tail:]
    return 1


def _lz4_numpy(src: Any, out: np.ndarray, elem_size: int) -> int:
    nbytes, block = header(src)
    dst = out.reshape(-1).view(np.uint8)
    pos = 0
    for off, clen, ulen in _walk_blocks(src, nbytes, block, 0):
        if clen == ulen:  # HDF5 LZ4 framing stores an incompressible block raw
            dst[pos:pos + ulen] = _u8(src)[off:off + clen]
        else:
            dst[pos:pos + ulen] = _u8(_lz4_raw_block(src, off, clen, ulen))
        pos += ulen
    return 1


def _lz4_block_c(src: Any, out: np.ndarray, elem_size: int) -> int:
    s = _u8(src)
    if s.size >= 2**31 or out.nbytes >= 2**31:
        raise CodecError("wrong_size", "LZ4 block larger than 2 GiB")
    got = _LZ4_C(s.ctypes.data, out.ctypes.data, s.size, out.nbytes)
    if got != out.nbytes:
        kind = "bad_compression" if got < 0 else "wrong_size"
        raise CodecError(kind, f"LZ4 block decoded to {got} (slot holds {out.nbytes} bytes)")
    return 0


def _lz4_block_py(src: Any, out: np.ndarray, elem_size: int) -> int:
    out.reshape(-1).view(np.uint8)[:] = _u8(_lz4_raw_block(src, 0, len(src), out.nbytes))
    return 1


def _raw(src: Any, out: np.ndarray, elem_size: int) -> int:
    if len(src) != out.nbytes:
        raise CodecError("wrong_size", f"raw payload of {len(src)} bytes, the frame slot holds {out.nbytes}")
    out.reshape(-1).view(np.uint8)[:] = _u8(src)
    return 1


# Fastest first (measured by benchmarks/bench_codecs.py; see docs/BENCHMARKS.md); the last entry of each
# list needs only numpy (+ the lz4 package for LZ4 payloads).
IMPLEMENTATIONS: dict[str, list[tuple[str, bool, Callable[[Any, np.ndarray, int], int]]]] = {
    BSLZ4: [
        ("dectris-ctypes", _DECTRIS_C is not None, _dectris_c_into(_COMPRESSION_BSLZ4)),
        ("dectris", _dectris is not None, _dectris_py("bslz4")),
        ("bitshuffle", _bitshuffle is not None, _bslz4_bitshuffle),
        ("numpy", _lz4block is not None, _bslz4_numpy),
    ],
    LZ4: [
        ("dectris-ctypes", _DECTRIS_C is not None, _dectris_c_into(_COMPRESSION_LZ4)),
        ("dectris", _dectris is not None, _dectris_py("lz4")),
        ("numpy", _lz4block is not None, _lz4_numpy),
    ],
    LZ4_BLOCK: [
        ("lz4-ctypes", _LZ4_C is not None, _lz4_block_c),
        ("lz4", _lz4block is not None, _lz4_block_py),
    ],
    RAW: [("numpy", True, _raw)],
}
_active: dict[str, str] = {}


def available(codec: str) -> list[str]:
    """Names of the usable implementations of `codec`, preferred first."""
    return [name for name, ok, _ in IMPLEMENTATIONS[codec] if ok]


def use(codec: str, name: str | None = None) -> None:
    """Pin the implementation of `codec` (benchmarks, tests); None returns to the fastest available."""
    if name is None:
        _active.pop(codec, None)
        return
    if name not in available(codec):
        raise ValueError(f"{codec} implementation {name!r} is not available here (have: {available(codec)})")
    _active[codec] = name


def backend(codec: str) -> str | None:
    """The implementation decode_into() uses for `codec`, or None when nothing can decode it here."""
    if codec in _active:
        return _active[codec]
    names = available(codec)
    return names[0] if names else None


def decode_into(codec: str, src: Any, out: np.ndarray, elem_size: int | None = None) -> int:
    """Decode payload `src` (bytes-like) into the C-contiguous array `out` (a ring slot view).

    Returns the number of whole-frame copies made (0 when the library wrote straight into `out`).
    Raises CodecError (kind "bad_compression", "wrong_size", "unsupported_encoding") and never writes past
    `out`; on error `out` may hold partial data, so the caller must not commit it.
    """
    if codec not in IMPLEMENTATIONS:
        raise CodecError("unsupported_encoding", f"unknown codec {codec!r} (known: {', '.join(CODECS)})")
    if not (out.flags.c_contiguous and out.flags.writeable):
        raise ValueError("decode_into needs a writable C-contiguous destination")
    es = out.itemsize if elem_size is None else int(elem_size)
    if es != out.itemsize and codec == BSLZ4:
        raise CodecError("wrong_dtype", f"bslz4 element size {es} does not match the {out.dtype} slot")
    if codec in (BSLZ4, LZ4):
        _check_header(src, out, es, codec)
    name = backend(codec)
    if name is None:
        raise CodecError("unsupported_encoding", f"no decoder for {codec} here: pip install dectris-compression lz4")
    fn = next(f for n, _, f in IMPLEMENTATIONS[codec] if n == name)
    return fn(src, out, es)


# ---- encoders (detector simulator, tests, benchmarks) ----------------------------------------------------

def _lz4_compress(data: Any) -> bytes:
    if _lz4block is None:
        raise RuntimeError("encoding LZ4 needs the 'lz4' package (pip install lz4)")
    return _lz4block.compress(data, store_size=False)


def encode(codec: str, arr: np.ndarray, block_bytes: int = BLOCK_BYTES) -> bytes:
    """Encode a frame exactly as a DECTRIS detector sends it (header included for bslz4 and lz4)."""
    a = np.ascontiguousarray(arr)
    a = a.astype(a.dtype.newbyteorder("<"), copy=False)
    raw = a.reshape(-1).view(np.uint8)
    if codec == RAW:
        return raw.tobytes()
    if codec == LZ4_BLOCK:
        return _lz4_compress(raw)
    head = _HEADER.pack(raw.size, block_bytes)
    es = a.itemsize
    if codec == BSLZ4:
        if block_bytes % (8 * es):
            raise ValueError(f"block of {block_bytes} B is not a multiple of 8 elements of {es} B")
        if _bitshuffle is not None:
            body = _bitshuffle.compress_lz4(a.reshape(-1), block_bytes // es)
            return head + body.tobytes()
        parts, tail = [head], raw.size % (8 * es)
        for start in range(0, raw.size - tail, block_bytes):
            blk = raw[start:min(start + block_bytes, raw.size - tail)]
            comp = _lz4_compress(bitshuffle_block(blk, es))
            parts += [struct.pack(">I", len(comp)), comp]
        parts.append(raw[raw.size - tail:].tobytes())
        return b"".join(parts)
    if codec == LZ4:
        parts = [head]
        for start in range(0, raw.size, block_bytes):
            blk = raw[start:start + block_bytes]
            comp = _lz4_compress(blk)
            if len(comp) >= blk.size:  # incompressible: stored raw, flagged by length == block length
                comp = blk.tobytes()
            parts += [struct.pack(">I", len(comp)), comp]
        return b"".join(parts)
    raise ValueError(f"unknown codec {codec!r} (known: {', '.join(CODECS)})")


# ---- V1 encoding strings ---------------------------------------------------------------------------------

def parse_v1_encoding(encoding: str) -> tuple[str, int | None]:
    """V1 `encoding` ([bs<BITS>][[-]lz4][<|>]) → (codec, bitshuffle element bytes or None).

    Big-endian (">") payloads are rejected: no DECTRIS detector sends them and decoding in place would need
    a byte swap the slot cannot absorb without a second pass.
    """
    e = encoding.strip()
    if e.endswith(">"):
        raise CodecError("unsupported_encoding", f"big-endian encoding {encoding!r} is not supported")
    e = e.rstrip("<")
    bits = None
    if e.startswith("bs"):
        digits = e[2:].split("-")[0].split("lz4")[0]
        if digits not in ("8", "16", "32"):
            raise CodecError("unsupported_encoding", f"bad bitshuffle width in encoding {encoding!r}")
        bits = int(digits)
        e = e[2 + len(digits):]
    e = e.lstrip("-")
    if e == "lz4":
        return (BSLZ4, bits // 8) if bits else (LZ4_BLOCK, None)
    if e == "" and bits is None:
        return RAW, None
    raise CodecError("unsupported_encoding", f"unknown encoding {encoding!r} (expected bsNN-lz4<, lz4< or <)")


def v1_encoding(codec: str, dtype: np.dtype) -> str:
    """The V1 encoding string a DECTRIS detector writes for `codec` and pixel `dtype`."""
    if codec == BSLZ4:
        return f"bs{8 * np.dtype(dtype).itemsize}-lz4<"
    if codec == LZ4_BLOCK:
        return "lz4<"
    if codec == RAW:
        return "<"
    raise ValueError(f"stream v1 has no encoding for {codec!r} (use bslz4, lz4-block or raw)")
