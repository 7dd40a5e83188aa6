"""DECTRIS SIMPLON stream v2: CBOR start / image / end messages decoded safely and landed in ring slots."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime, timezone
from fractions import Fraction
from typing import Any, NamedTuple

import numpy as np

from ..codecs import BSLZ4, LZ4, RAW, CodecError, decode_into
from .dectris_common import DectrisSource, MessageError

MAGIC = b"\xd9\xd9\xf7"  # tag 55799, self-described CBOR: every DECTRIS message starts with it
TAG_DATETIME, TAG_EPOCH, TAG_RATIONAL, TAG_MULTIDIM, TAG_COMPRESSED = 0, 1, 30, 40, 56500
# RFC 8746 typed arrays (tags 64-87) → numpy dtypes; 76 is reserved and float128 has no numpy equivalent.
TYPED_ARRAYS: dict[int, np.dtype] = {
    tag: np.dtype(code) for tag, code in {
        64: "u1", 65: ">u2", 66: ">u4", 67: ">u8", 68: "u1", 69: "<u2", 70: "<u4", 71: "<u8",
        72: "i1", 73: ">i2", 74: ">i4", 75: ">i8", 77: "<i2", 78: "<i4", 79: "<i8",
        80: ">f2", 81: ">f4", 82: ">f8", 84: "<f2", 85: "<f4", 86: "<f8",
    }.items()
}
TYPED_ARRAY_TAG = {"uint8": 64, "uint16": 69, "uint32": 70, "float32": 85}  # what DECTRIS sends
# cbor2 decodes these tags itself, some by evaluating network input (35 compiles a regex, 36 parses MIME,
# 5 raises 2 to an arbitrary power, 28/29 build shared references). All are left inert instead.
_INERT_TAGS = (2, 3, 4, 5, 25, 28, 29, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261, 1004)
_MAX_DEPTH = 16


class Compressed(NamedTuple):
    """Tag 56500 content: still compressed until the frame is written into its ring slot."""
    algorithm: str
    elem_size: int
    data: bytes


class TypedArray(NamedTuple):
    tag: int
    dtype: np.dtype
    data: bytes | Compressed


class MultiDimArray(NamedTuple):
    dims: tuple[int, ...]  # row-major: (height, width) for images
    array: TypedArray


def _is_uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 64


def _tag_hook(*args: Any) -> Any:
    """Builds inert records for the tags DECTRIS uses; anything else stays a CBORTag. Never evaluates."""
    tag = args[0] if hasattr(args[0], "tag") else args[1]  # cbor2 6: (tag, immutable); cbor2 5: (decoder, tag)
    t, v = tag.tag, tag.value
    if t == TAG_COMPRESSED:
        if (isinstance(v, (list, tuple)) and len(v) == 3 and isinstance(v[0], str) and _is_uint(v[1])
                and isinstance(v[2], bytes)):
            return Compressed(v[0], v[1], v[2])
    elif t in TYPED_ARRAYS:
        if isinstance(v, (bytes, Compressed)):
            return TypedArray(t, TYPED_ARRAYS[t], v)
    elif t == TAG_MULTIDIM:
        if (isinstance(v, (list, tuple)) and len(v) == 2 and isinstance(v[0], (list, tuple))
                and all(_is_uint(d) for d in v[0]) and isinstance(v[1], TypedArray)):
            return MultiDimArray(tuple(v[0]), v[1])
    return tag


def _inert(tag: int) -> Any:
    from cbor2 import CBORTag

    return lambda value, immutable=False: CBORTag(tag, value)


def _datetime(value: Any, immutable: bool = False) -> Any:
    """Tag 0 (RFC 3339 text) → aware datetime; anything unparsable is kept as its text."""
    if isinstance(value, str) and len(value) < 64:
        try:
            return datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith("Z") else value)
        except ValueError:
            pass
    return value


def _epoch(value: Any, immutable: bool = False) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
            and abs(value) < 1e11:
        return datetime.fromtimestamp(value, timezone.utc)
    return value


def _rational(value: Any, immutable: bool = False) -> Any:
    if isinstance(value, (list, tuple)) and len(value) == 2 and _is_uint(value[0]) and _is_uint(value[1]) \
            and value[1] > 0:
        return Fraction(value[0], value[1])
    return _inert(TAG_RATIONAL)(value)


def semantic_decoders() -> dict[int, Any]:
    out = {t: _inert(t) for t in _INERT_TAGS}
    out.update({TAG_DATETIME: _datetime, TAG_EPOCH: _epoch, TAG_RATIONAL: _rational})
    return out


_SEMANTIC: dict[int, Any] | None = None


def loads(message: bytes) -> Mapping[str, Any]:
    """Decode one message with the safe hooks; MessageError("garbage") if it is not a CBOR map with a type."""
    global _SEMANTIC
    import cbor2

    if _SEMANTIC is None:
        _SEMANTIC = semantic_decoders()
    try:
        msg = cbor2.loads(message, tag_hook=_tag_hook, semantic_decoders=_SEMANTIC, max_depth=_MAX_DEPTH,
                          allow_indefinite=False, strict_hashable_types=True, allow_duplicate_keys=False)
    except Exception as exc:  # CBORDecodeError and whatever a malformed item provokes inside cbor2
        raise MessageError("garbage", f"not a CBOR message ({type(exc).__name__}: {str(exc)[:80]})") from None
    if not isinstance(msg, Mapping) or not isinstance(msg.get("type"), str):
        raise MessageError("garbage", f"CBOR {type(msg).__name__} without a 'type' key")
    return msg


def codec_of(array: TypedArray) -> tuple[str, Any, int | None]:
    """(codec, payload, elem_size) for a typed array's bytes."""
    data = array.data
    if isinstance(data, bytes):
        return RAW, data, None
    if data.algorithm == "bslz4":
        if data.elem_size != array.dtype.itemsize:
            raise MessageError("wrong_dtype", f"bslz4 element size {data.elem_size} in a {array.dtype} array")
        return BSLZ4, data.data, data.elem_size
    if data.algorithm == "lz4":
        return LZ4, data.data, None
    raise MessageError("unsupported_encoding", f"compression {data.algorithm[:20]!r} (known: bslz4, lz4)")


def to_array(value: Any, what: str) -> np.ndarray:
    """A (small) MultiDimArray or TypedArray from a start message → a new native-order numpy array."""
    if isinstance(value, MultiDimArray):
        dims, array = value.dims, value.array
    elif isinstance(value, TypedArray):
        dims, array = None, value
    else:
        raise MessageError("garbage", f"{what}: not a typed array ({type(value).__name__})")
    codec, payload, elem = codec_of(array)
    n = len(payload) // array.dtype.itemsize if codec == RAW else None
    if dims is None and n is None:  # compressed 1-D table: its size is in the chunk header
        n = int.from_bytes(payload[:8], "big") // array.dtype.itemsize if len(payload) >= 12 else 0
    shape = tuple(dims) if dims is not None else (n,)
    if math.prod(shape) * array.dtype.itemsize > 1 << 30:
        raise MessageError("wrong_size", f"{what}: shape {shape} is implausibly large")
    out = np.empty(shape, array.dtype)
    try:
        decode_into(codec, payload, out.reshape(-1), elem)
    except CodecError as exc:
        raise MessageError(exc.kind, f"{what}: {exc}") from None
    return out.astype(out.dtype.newbyteorder("="), copy=False)


def _plain(value: Any, depth: int = 0) -> Any:
    """JSON-safe copy of a header field (numbers, text, lists, maps); arrays and unknown tags dropped."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, Fraction):
        return float(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if depth < 4 and isinstance(value, (list, tuple)) and not isinstance(value, (TypedArray, MultiDimArray,
                                                                                   Compressed)):
        return [_plain(v, depth + 1) for v in value]
    if depth < 4 and isinstance(value, Mapping):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()
                if not isinstance(v, (TypedArray, MultiDimArray))}
    return None


def _seconds(value: Any) -> float:
    if isinstance(value, Fraction):
        return float(value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and _is_uint(value[0]) and _is_uint(value[1]) \
            and value[1]:
        return value[0] / value[1]  # a rational sent as a bare [num, den] array
    return math.nan


class DectrisV2Source(DectrisSource):
    """Receives SIMPLON stream v2 (CBOR) from tcp://<DCU>:31001 (PULL; clients share frames round-robin).

    `channel` picks the image channel landed in the ring (default: the first of the start message's
    `channels`, e.g. threshold_1); masks and flatfields of every channel are kept in `masks` / `flatfields`,
    the chosen channel's in `mask` / `flatfield`. t_detector = series_date + start_time (Unix seconds).
    """

    name = "dectris-v2"
    default_port = 31001

    def __init__(self, *args: Any, channel: str | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.channel, self.channels = channel, ()
        self.masks: dict[str, np.ndarray] = {}
        self.flatfields: dict[str, np.ndarray] = {}
        self.series_unique_id: str | None = None

    @classmethod
    def probe(cls) -> None:
        super().probe()
        from .base import SourceUnavailable

        try:
            import cbor2
            cbor2.loads(b"\xd9\xd9\xf7\xa0", tag_hook=_tag_hook, semantic_decoders={}, max_depth=4)
        except ImportError:
            raise SourceUnavailable(cls.name, "cbor2 is missing", "pip install 'cbor2>=6'") from None
        except TypeError:
            raise SourceUnavailable(cls.name, "cbor2 too old (no semantic_decoders)", "pip install 'cbor2>=6'") from None

    def _receive(self, sock: Any) -> bytes:
        import zmq

        return sock.recv(flags=zmq.NOBLOCK)  # cbor2 copies any non-bytes input, so take bytes at once

    def handle(self, message: Any) -> None:
        message = bytes(message) if not isinstance(message, bytes) else message
        if not message.startswith(MAGIC):
            self._issue("no_cbor_magic", "message without the self-described CBOR tag 55799 (accepted)")
        msg = loads(message)
        kind = msg["type"]
        series = msg.get("series_id")
        if not _is_uint(series):
            raise MessageError("garbage", f"{kind} message: series_id {series!r} is not an unsigned integer")
        if kind == "image":
            self._image(msg, series)
        elif kind == "start":
            self._start(msg, series)
        elif kind == "end":
            self.end_series(series)
        else:
            raise MessageError("unknown_type", f"unknown message type {kind[:40]!r}")

    def _pick(self, available: Any) -> str | None:
        if self.channel is not None:
            return self.channel
        for ch in (*self.channels, "threshold_1"):
            if ch in available:
                return ch
        return next(iter(available), None)

    def _start(self, msg: Mapping[str, Any], series: int) -> None:
        self.begin_series(series)
        self.series_unique_id = msg.get("series_unique_id") if isinstance(msg.get("series_unique_id"), str) else None
        channels = msg.get("channels")
        self.channels = tuple(c for c in channels if isinstance(c, str)) if isinstance(channels, (list, tuple)) else ()
        self.detector_config = {k: v for k, v in ((str(k), _plain(v)) for k, v in msg.items()) if v is not None}
        for key, store in (("pixel_mask", self.masks), ("flatfield", self.flatfields)):
            maps = msg.get(key)
            if not isinstance(maps, Mapping):
                continue
            for ch, value in maps.items():
                try:
                    store[str(ch)] = to_array(value, f"start {key}[{ch}]")
                except MessageError as exc:
                    self._issue(exc.kind, str(exc))
        lut = msg.get("countrate_correction_lookup_table")
        if lut is not None:
            try:
                self.countrate_table = to_array(lut, "start countrate_correction_lookup_table")
            except MessageError as exc:
                self._issue(exc.kind, str(exc))
        ch = self._pick(self.masks or self.flatfields or self.channels)
        if ch is not None:
            self.mask = self.masks.get(ch, self.mask)
            self.flatfield = self.flatfields.get(ch, self.flatfield)
        self.remember_mask(series)

    def _image(self, msg: Mapping[str, Any], series: int) -> None:
        image_id = msg.get("image_id")
        if not _is_uint(image_id):
            raise MessageError("garbage", f"image: image_id {image_id!r} is not an unsigned integer")
        data = msg.get("data")
        if not isinstance(data, Mapping) or not data:
            raise MessageError("truncated", f"image {image_id}: no data map")
        ch = self._pick(data)
        md = data.get(ch)
        if not isinstance(md, MultiDimArray):
            raise MessageError("missing_channel" if md is None else "garbage",
                               f"image {image_id}: channel {ch!r} is not a row-major typed array "
                               f"(channels: {[str(k)[:20] for k in list(data)[:4]]})")
        if len(md.dims) != 2:
            raise MessageError("wrong_size", f"image {image_id}: {len(md.dims)}-D data, expected [height, width]")
        dtype = md.array.dtype
        if dtype.byteorder == ">" or dtype.kind not in "uif":
            raise MessageError("wrong_dtype", f"image {image_id}: typed array tag {md.array.tag} not landable")
        codec, payload, elem = codec_of(md.array)
        h, w = md.dims
        if codec == RAW and len(payload) != h * w * dtype.itemsize:
            kind = "truncated" if len(payload) < h * w * dtype.itemsize else "wrong_size"
            raise MessageError(kind, f"image {image_id}: {len(payload)} bytes for [{h}, {w}] {dtype.name}")
        date = msg.get("series_date")
        t0 = date.timestamp() if isinstance(date, datetime) else math.nan
        self.land(series, image_id, (h, w), dtype.newbyteorder("="), codec, payload, elem,
                  t0 + _seconds(msg.get("start_time")))
