"""The results stream: ZeroMQ PUB of patches, mosaics and status, and the reference Subscriber that reads it.

Message = multipart [topic, JSON header, raw little-endian array bytes...]; the header's "arrays" list names
each array part in order with its dtype and shape. Schema: docs/results-stream.md. Nothing is pickled.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

SCHEMA = "edgeptycho.results"
SCHEMA_VERSION = "1.0"
TOPICS = ("patch", "mosaic", "status")
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5560"
# What a reader accepts in "arrays": plain little-endian numbers only (no object, no structured dtypes).
ALLOWED_DTYPES = frozenset({"|u1", "|i1", "|b1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f2", "<f4", "<f8",
                            "<c8", "<c16"})
MAX_ARRAY_BYTES = 1 << 31


class SchemaError(ValueError):
    """A received message does not follow the results-stream schema; the message says which part."""


def _num(x: float) -> str:
    """A float as JSON (NaN/inf → null; repr keeps every digit)."""
    return repr(x) if math.isfinite(x) else "null"


def _json_nums(a: np.ndarray) -> list[str]:
    """Every element of a float array (row-major) as JSON number text, as _num writes it (NaN/inf → null)."""
    flat = a.ravel()
    out = list(map(repr, flat.tolist()))
    for k in np.flatnonzero(~np.isfinite(flat)).tolist():
        out[k] = "null"
    return out


def _le(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.astype(a.dtype.newbyteorder("<")) if a.dtype.byteorder == ">" else a


def _array_desc(name: str, a: np.ndarray) -> dict[str, Any]:
    dt = a.dtype.str if a.dtype.byteorder != ">" else a.dtype.newbyteorder("<").str
    return {"name": name, "dtype": dt, "shape": list(a.shape)}


@dataclass
class StreamContext:
    """What stays fixed for a scan; pre-serialised once into every patch header."""

    scan_id: str = ""
    pixel_size_m: float = math.nan  # object pixel of the patches
    model: dict[str, str] = field(default_factory=lambda: {"name": "", "version": "", "sha256": ""})
    backend: str = ""
    precision: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # anything else, e.g. {"patch_origin": "centre"}


class Publisher:
    """PUB socket for the results stream; sends never block (a slow or absent subscriber costs nothing).

    count_drops=True sets XPUB_NODROP so a full subscriber queue surfaces as zmq.Again and is counted in
    `dropped` (while one subscriber is full, that message reaches nobody); False keeps ZeroMQ's per-subscriber
    silent dropping, and `dropped` stays 0. Array bytes are copied into ZeroMQ, so callers may reuse buffers.
    """

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, sndhwm: int = 1000, count_drops: bool = True,
                 context: zmq.Context | None = None, bind: bool = True):
        self._ctx = context or zmq.Context.instance()
        self.sock = self._ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.SNDHWM, sndhwm)
        self.sock.setsockopt(zmq.LINGER, 0)
        if count_drops:
            self.sock.setsockopt(zmq.XPUB_NODROP, 1)
        (self.sock.bind if bind else self.sock.connect)(endpoint)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT) if bind else endpoint
        self.sent = dict.fromkeys(TOPICS, 0)
        self.dropped = dict.fromkeys(TOPICS, 0)
        self.set_context(StreamContext())

    def set_context(self, context: StreamContext) -> None:
        """Fix the per-scan header fields (scan id, model, backend, pixel size...)."""
        self.context = context
        static = {"scan_id": context.scan_id, "pixel_size_m": context.pixel_size_m if math.isfinite(
            context.pixel_size_m) else None, "model": context.model, "backend": context.backend,
            "precision": context.precision, **context.extra}
        self._static = json.dumps(static)[1:-1]  # the middle of an object, spliced into every header
        self._arrays_cache: dict[tuple[Any, ...], str] = {}

    def _send(self, topic: str, parts: list[Any]) -> bool:
        try:
            self.sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=True)
        except zmq.Again:
            self.dropped[topic] += 1
            return False
        self.sent[topic] += 1
        return True

    def publish_patches(self, meta: np.ndarray, amplitude: np.ndarray, phase: np.ndarray, t_inferred: float,
                        quality: Mapping[str, np.ndarray] | None = None,
                        extra_arrays: Mapping[str, np.ndarray] | None = None) -> int:
        """One `patch` message per frame of a batch; returns how many went out (the rest were dropped).

        meta: the batch's ring metadata (META_DTYPE: frame_id, series_id, position_px/m, t_detector,
        t_received); amplitude, phase: (n, M, M); quality: name → (n,) per-frame figures or a scalar; extra_arrays:
        name → (n, ...) more per-frame arrays (e.g. "uncertainty"). Headers are built from a pre-serialised
        template with one string format per frame.
        """
        n = len(meta)
        arrays = {"amplitude": _le(amplitude), "phase": _le(phase)}
        arrays.update({k: _le(v) for k, v in (extra_arrays or {}).items()})
        for name, a in arrays.items():
            if a.shape[0] < n:
                raise ValueError(f"publish_patches: {name} holds {a.shape[0]} frames, meta {n}")
        key = tuple((name, a.dtype.str, a.shape[1:]) for name, a in arrays.items())
        tail = self._arrays_cache.get(key)
        if tail is None:
            tail = json.dumps([_array_desc(name, a[0]) for name, a in arrays.items()])
            self._arrays_cache[key] = tail
        q_names = [json.dumps(str(k)) for k in quality or {}]
        try:  # a scalar applies to the whole batch
            q_cols = [np.broadcast_to(np.asarray(v, np.float64), (n,)).tolist() for v in (quality or {}).values()]
        except ValueError as exc:
            raise ValueError(f"publish_patches: quality figures must be scalars or ({n},) arrays: {exc}") from None
        ids, series = meta["frame_id"].tolist(), meta["series_id"].tolist()
        # The batch's numbers as JSON text in one pass (6 per frame: position m, position px, t_detector,
        # t_received), and one quality object per frame: the per-frame loop only splices strings.
        v = _json_nums(np.concatenate([meta["position_m"], meta["position_px"], meta["t_detector"][:, None],
                                       meta["t_received"][:, None]], axis=1))
        if q_cols:
            qv = _json_nums(np.array(q_cols, np.float64).T)
            nq = len(q_names)
            q_json = [",".join(f"{k}:{qv[i * nq + j]}" for j, k in enumerate(q_names)) for i in range(n)]
        else:
            q_json = [""] * n
        head = f'{{"schema":"{SCHEMA}","schema_version":"{SCHEMA_VERSION}","topic":"patch",'.encode()
        mid = f',{self._static},"arrays":{tail},"t_inferred":{_num(t_inferred)},"t_published":'
        values = list(arrays.values())
        last = len(values) - 1
        sock, more, now = self.sock, zmq.SNDMORE | zmq.NOBLOCK, time.time
        sent = 0
        for i in range(n):
            f = 6 * i
            header = (f'"frame_id":{ids[i]},"series_id":{series[i]},"position_m":[{v[f]},{v[f + 1]}],'
                      f'"position_px":[{v[f + 2]},{v[f + 3]}],"t_detector":{v[f + 4]},"t_received":{v[f + 5]},'
                      f'"quality":{{{q_json[i]}}}{mid}{_num(now())}}}')
            try:  # send_multipart's loop, inlined: the parts of one patch, atomically (ZeroMQ multipart)
                sock.send(b"patch", more)
                sock.send(head + header.encode(), more)
                for k, a in enumerate(values):
                    sock.send(a[i], zmq.NOBLOCK if k == last else more)
            except zmq.Again:  # only the first part can be refused (a full subscriber with XPUB_NODROP)
                self.dropped["patch"] += 1
                continue
            sent += 1
        self.sent["patch"] += sent
        return sent

    def publish_mosaic(self, amplitude: np.ndarray, phase: np.ndarray, origin_m: Iterable[float],
                       pixel_size_m: float, n_frames: int, weight: np.ndarray | None = None,
                       extra: Mapping[str, Any] | None = None,
                       extra_arrays: Mapping[str, np.ndarray] | None = None) -> bool:
        """The stitched image so far: amplitude, phase (H, W) (+ weight, + extra_arrays such as
        "uncertainty") with the mosaic's origin (y, x) m."""
        arrays = {"amplitude": _le(amplitude), "phase": _le(phase)}
        if weight is not None:
            arrays["weight"] = _le(weight)
        arrays.update({k: _le(v) for k, v in (extra_arrays or {}).items()})
        header = self._header("mosaic", {
            "scan_id": self.context.scan_id, "origin_m": [float(v) for v in origin_m],
            "pixel_size_m": float(pixel_size_m), "n_frames": int(n_frames), **(extra or {}),
        }, arrays)
        return self._send("mosaic", [b"mosaic", header, *arrays.values()])

    def publish_status(self, status: Mapping[str, Any]) -> bool:
        """Service health: rates, latency percentiles, drops, quality (any JSON-safe mapping)."""
        header = self._header("status", {"scan_id": self.context.scan_id, **status}, {})
        return self._send("status", [b"status", header])

    def _header(self, topic: str, fields: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
        body = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "topic": topic, **fields,
                "arrays": [_array_desc(k, a) for k, a in arrays.items()], "t_published": time.time()}
        return json.dumps(body, allow_nan=False, default=_json_default).encode()

    def stats(self) -> dict[str, dict[str, int]]:
        return {"sent": dict(self.sent), "dropped": dict(self.dropped)}

    def close(self) -> None:
        self.sock.close(linger=0)

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


@dataclass
class Message:
    """One decoded results-stream message; arrays are read-only views on the received bytes."""

    topic: str
    header: dict[str, Any]
    arrays: dict[str, np.ndarray]

    @property
    def residual(self) -> float | None:
        """A patch's forward residual (quality.residual); None when the frame was not checked or the
        publisher predates the field."""
        q = self.header.get("quality")
        v = q.get("residual") if isinstance(q, dict) else None
        return float(v) if isinstance(v, (int, float)) else None


def decode(parts: list[Any]) -> Message:
    """Validate and decode a multipart message (bytes or zmq.Frame parts); raises SchemaError."""
    if len(parts) < 2:
        raise SchemaError(f"expected at least 2 parts (topic, header), got {len(parts)}")
    raw = [p.buffer if isinstance(p, zmq.Frame) else p for p in parts]
    topic = bytes(raw[0]).decode("ascii", "replace")
    if topic not in TOPICS:
        raise SchemaError(f"unknown topic {topic!r}")
    try:
        header = json.loads(bytes(raw[1]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SchemaError(f"header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise SchemaError("header must be a JSON object")
    if header.get("schema") != SCHEMA:
        raise SchemaError(f"schema {header.get('schema')!r} is not {SCHEMA!r}")
    version = str(header.get("schema_version", ""))
    if version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise SchemaError(f"schema_version {version!r} is incompatible with {SCHEMA_VERSION}")
    if header.get("topic") != topic:
        raise SchemaError(f"header topic {header.get('topic')!r} does not match part topic {topic!r}")
    descs = header.get("arrays", [])
    if not isinstance(descs, list) or len(descs) != len(raw) - 2:
        raise SchemaError(f"header lists {len(descs) if isinstance(descs, list) else '?'} arrays, "
                          f"message carries {len(raw) - 2}")
    arrays: dict[str, np.ndarray] = {}
    for desc, buf in zip(descs, raw[2:], strict=True):
        if not isinstance(desc, dict) or not isinstance(desc.get("name"), str):
            raise SchemaError(f"bad array description {desc!r}")
        dt, shape = desc.get("dtype"), desc.get("shape")
        if dt not in ALLOWED_DTYPES:
            raise SchemaError(f"array {desc['name']!r}: dtype {dt!r} not allowed")
        if not isinstance(shape, list) or not all(isinstance(s, int) and 0 <= s for s in shape):
            raise SchemaError(f"array {desc['name']!r}: bad shape {shape!r}")
        dtype = np.dtype(dt)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes > MAX_ARRAY_BYTES or nbytes != memoryview(buf).nbytes:
            raise SchemaError(f"array {desc['name']!r}: {memoryview(buf).nbytes} bytes for shape {shape} {dt}")
        arrays[desc["name"]] = np.frombuffer(buf, dtype=dtype).reshape(shape)
    return Message(topic, header, arrays)


def close_receiver(sock: zmq.Socket, topics: Iterable[bytes] = (), drain_s: float = 0.05) -> None:
    """Close a receiving socket (SUB, PULL) without leaving a multipart message half-delivered.

    libzmq 4.3 can abort the whole process (errno_assert in session_base.cpp, libzmq#3442) when a socket
    is torn down mid-message, and our messages are multipart. A SUB unsubscribes from `topics` first, so
    no new ones come; then what is in flight is read until the line is quiet (at most `drain_s`).
    """
    if sock.closed:
        return
    for t in topics:
        sock.setsockopt(zmq.UNSUBSCRIBE, t)
    deadline = time.monotonic() + drain_s
    while time.monotonic() < deadline and sock.poll(5):
        sock.recv_multipart(copy=False)
    sock.close(linger=0)


class Subscriber:
    """The reference reader: SUB socket → validated Messages. Iterating skips (and counts) invalid ones."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, topics: Iterable[str] = TOPICS, rcvhwm: int = 1000,
                 context: zmq.Context | None = None):
        self._ctx = context or zmq.Context.instance()
        self.sock = self._ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.topics = list(topics)
        for t in self.topics:
            if t not in TOPICS:
                raise ValueError(f"unknown topic {t!r}; topics are {TOPICS}")
            self.sock.setsockopt(zmq.SUBSCRIBE, t.encode())
        self.sock.connect(endpoint)
        self.invalid = 0

    def recv(self, timeout: float | None = None) -> Message | None:
        """The next message, or None after `timeout` seconds; raises SchemaError on an invalid one."""
        if timeout is not None and not self.sock.poll(int(timeout * 1000)):
            return None
        return decode(self.sock.recv_multipart(copy=False))

    def __iter__(self) -> Iterator[Message]:
        while True:
            try:
                msg = self.recv()
            except SchemaError:
                self.invalid += 1
                continue
            if msg is not None:
                yield msg

    def close(self, drain_s: float = 0.05) -> None:
        close_receiver(self.sock, [t.encode() for t in self.topics], drain_s)

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
