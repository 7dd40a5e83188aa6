"""DECTRIS SIMPLON stream v1 ("legacy"): multipart JSON + binary messages parsed and landed in ring slots."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..codecs import BSLZ4, RAW, CodecError, parse_v1_encoding
from .dectris_common import DectrisSource, MessageError

HEADER, IMAGE, IMAGE_D, CONFIG, END = "dheader-1.0", "dimage-1.0", "dimage_d-1.0", "dconfig-1.0", "dseries_end-1.0"
# Header parts that carry an array (a JSON descriptor then a blob), and the attribute each lands in.
ARRAY_PARTS = {"dflatfield-1.0": "flatfield", "dpixelmask-1.0": "mask", "dcountrate_table-1.0": "countrate_table"}
PIXEL_TYPES = {"uint8": np.dtype("u1"), "uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
ARRAY_TYPES = {**PIXEL_TYPES, "float32": np.dtype("<f4"), "float64": np.dtype("<f8"), "int32": np.dtype("<i4")}
DETAILS = ("all", "basic", "none")
_MAX_JSON = 1 << 20  # a JSON part larger than this is not a DECTRIS header: refuse before parsing it
_MAX_SIDE = 1 << 16


def _bytes(part: Any) -> bytes:
    return part.bytes if hasattr(part, "bytes") else bytes(part)


def _buffer(part: Any) -> Any:
    """Zero-copy view of a part: zmq.Frame.buffer on the wire, the object itself in tests."""
    return part.buffer if hasattr(part, "buffer") else part


def _json(part: Any, what: str) -> dict[str, Any]:
    raw = _bytes(part)
    if len(raw) > _MAX_JSON:
        raise MessageError("garbage", f"{what}: {len(raw)}-byte part where a JSON header belongs")
    try:
        value = json.loads(raw)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        raise MessageError("garbage", f"{what}: not JSON ({raw[:32]!r})") from None
    if not isinstance(value, dict):
        raise MessageError("garbage", f"{what}: JSON {type(value).__name__}, expected an object")
    return value


def _lookup(table: dict[str, Any], key: Any) -> Any:
    return table.get(key) if isinstance(key, str) else None  # JSON may put a list where a name belongs


def _uint(d: dict[str, Any], key: str, what: str) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise MessageError("garbage", f"{what}: '{key}' must be a non-negative integer, got {v!r}")
    return v


def _shape(d: dict[str, Any], what: str) -> tuple[int, int]:
    """V1 shape [x, y] = [width, height] → numpy (height, width)."""
    s = d.get("shape")
    if (not isinstance(s, list) or len(s) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v < _MAX_SIDE for v in s)):
        raise MessageError("garbage", f"{what}: 'shape' must be [width, height], got {s!r}")
    return s[1], s[0]


@dataclass
class V1Header:
    series: int
    detail: str
    config: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # mask / flatfield / countrate_table
    appendix: bytes | None = None
    problems: list[tuple[str, str]] = field(default_factory=list)  # (kind, detail) survived in the header


@dataclass
class V1Image:
    series: int
    frame: int
    shape: tuple[int, int]  # numpy (height, width)
    dtype: np.dtype
    codec: str
    elem_size: int | None
    payload: Any  # buffer of part 3, still encoded
    md5: str
    times_ns: dict[str, int] = field(default_factory=dict)
    appendix: bytes | None = None


def parse_header(parts: list[Any], first: dict[str, Any]) -> V1Header:
    """A dheader-1.0 message: detector config (basic, all), flatfield / pixel mask / countrate table (all)."""
    detail = first.get("header_detail", "none")
    if detail not in DETAILS:
        raise MessageError("garbage", f"dheader: header_detail {detail!r} is not one of {DETAILS}")
    h = V1Header(series=_uint(first, "series", "dheader"), detail=detail)
    i = 1
    if detail in ("basic", "all"):
        if len(parts) < 2:
            raise MessageError("truncated", f"dheader (detail {detail}) without its detector config part")
        h.config, i = _json(parts[1], "dheader config"), 2
    while detail == "all" and i < len(parts):
        try:
            desc = _json(parts[i], f"dheader part {i + 1}")
        except MessageError:
            break  # not a descriptor: the header appendix
        name = _lookup(ARRAY_PARTS, desc.get("htype"))
        if name is None:
            break
        if i + 1 >= len(parts):
            h.problems.append(("truncated", f"dheader: {desc['htype']} without its data part"))
            return h
        try:
            h.arrays[name] = _header_array(desc, parts[i + 1])
        except MessageError as exc:
            h.problems.append((exc.kind, str(exc)))
        i += 2
    if i < len(parts):
        h.appendix = _bytes(parts[i])
    return h


def _header_array(desc: dict[str, Any], blob: Any) -> np.ndarray:
    what = desc["htype"]
    dtype = _lookup(ARRAY_TYPES, desc.get("type"))
    if dtype is None:
        raise MessageError("wrong_dtype", f"{what}: unknown type {str(desc.get('type'))[:40]!r}")
    shape = _shape(desc, what)
    data = _buffer(blob)
    want = shape[0] * shape[1] * dtype.itemsize
    if len(data) != want:
        kind = "truncated" if len(data) < want else "wrong_size"
        raise MessageError(kind, f"{what}: {len(data)} bytes for shape {shape} {dtype.name} ({want} bytes)")
    return np.frombuffer(data, dtype).reshape(shape).copy()  # the message buffer is freed after handling


def parse_image(parts: list[Any], first: dict[str, Any]) -> V1Image:
    """A dimage-1.0 message: ids, pixel descriptor, the still-encoded blob, detector times, appendix."""
    series, frame = _uint(first, "series", "dimage"), _uint(first, "frame", "dimage")
    if len(parts) < 3:
        raise MessageError("truncated", f"dimage {series}/{frame}: {len(parts)} parts, need 3 or more")
    d = _json(parts[1], "dimage part 2")
    if d.get("htype") != IMAGE_D:
        raise MessageError("unknown_type", f"dimage part 2 has htype {str(d.get('htype'))[:40]!r}, expected {IMAGE_D}")
    shape = _shape(d, "dimage_d")
    dtype = _lookup(PIXEL_TYPES, d.get("type"))
    if dtype is None:
        raise MessageError("wrong_dtype", f"dimage_d: pixel type {str(d.get('type'))[:40]!r} is not one of {list(PIXEL_TYPES)}")
    enc = d.get("encoding", "<")
    if not isinstance(enc, str):
        raise MessageError("unsupported_encoding", f"dimage_d: encoding {enc!r} is not a string")
    try:
        codec, elem = parse_v1_encoding(enc)
    except CodecError as exc:
        raise MessageError(exc.kind, str(exc)) from None
    if codec == BSLZ4 and elem != dtype.itemsize:
        raise MessageError("wrong_dtype", f"dimage_d: encoding {enc} does not match pixel type {d.get('type')}")
    payload = _buffer(parts[2])
    size = d.get("size", len(payload))
    if size != len(payload):
        kind = "truncated" if isinstance(size, int) and len(payload) < size else "wrong_size"
        raise MessageError(kind, f"frame {frame}: blob of {len(payload)} bytes, dimage_d size says {size!r}")
    if codec == RAW and len(payload) != shape[0] * shape[1] * dtype.itemsize:
        raise MessageError("wrong_size", f"frame {frame}: raw blob of {len(payload)} bytes for {shape} {dtype.name}")
    img = V1Image(series, frame, shape, dtype, codec, elem, payload, str(first.get("hash") or ""))
    if len(parts) > 3:
        try:
            cfg = _json(parts[3], "dconfig")
        except MessageError:
            cfg = {}
        img.times_ns = {k: v for k in ("start_time", "stop_time", "real_time")
                        if isinstance(v := cfg.get(k), int) and not isinstance(v, bool)}
    if len(parts) > 4:
        img.appendix = _bytes(parts[4])
    return img


class DectrisV1Source(DectrisSource):
    """Receives SIMPLON stream v1 from tcp://<DCU>:9999 (PULL; several clients share frames round-robin).

    Options as DectrisSource, plus `verify_hash`: check each blob's md5 against dimage-1.0 `hash` (≈2 ms per
    MB on a small CPU, so off by default; an empty hash, as simulators send, is never checked).
    V1 carries only the detector's relative clock, so t_detector stays NaN; the ns times are not epochs.
    """

    name = "dectris-v1"
    default_port = 9999

    def __init__(self, *args: Any, verify_hash: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.verify_hash = verify_hash
        self.header_appendix: bytes | None = None
        self.image_appendix: bytes | None = None

    def _receive(self, sock: Any) -> list[Any]:
        import zmq

        # copy=False: the blob stays in libzmq's buffer and is decoded from there straight into the slot.
        return sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)

    def handle(self, parts: list[Any]) -> None:
        if not parts:
            raise MessageError("garbage", "empty message")
        first = _json(parts[0], "part 1")
        htype = first.get("htype")
        if not isinstance(htype, str):
            raise MessageError("garbage", f"part 1 has no htype ({list(first)[:5]})")
        if htype.startswith("dimage-"):
            img = parse_image(parts, first)
            if self.verify_hash and img.md5 and hashlib.md5(img.payload).hexdigest() != img.md5.lower():
                raise MessageError("hash_mismatch", f"frame {img.frame}: md5 of the blob differs from 'hash'")
            if img.appendix is not None:
                self.image_appendix = img.appendix
            self.land(img.series, img.frame, img.shape, img.dtype, img.codec, img.payload, img.elem_size,
                      math.nan)
        elif htype.startswith("dheader-"):
            h = parse_header(parts, first)
            self.begin_series(h.series)
            self.detector_config = {"header_detail": h.detail, **h.config}
            self.header_appendix = h.appendix
            for name, array in h.arrays.items():  # a header without them keeps the last ones (same detector)
                setattr(self, name, array)
            self.remember_mask(h.series)
            for kind, detail in h.problems:
                self._issue(kind, detail)
        elif htype.startswith("dseries_end-"):
            self.end_series(_uint(first, "series", "dseries_end"))
        else:
            raise MessageError("unknown_type", f"unknown htype {htype[:40]!r}")
