"""EPICS PV Access NTNDArray (areaDetector PVA plugin, ADEiger) frames into ring slots, via p4p or pvapy."""

from __future__ import annotations

import logging
import math
import queue
import struct
import threading
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from ..codecs import BLOCK_BYTES, BSLZ4, LZ4, LZ4_BLOCK, RAW
from ..ring import RingClosed
from .base import RingWriter, SourceStats, SourceUnavailable
from .dectris_common import DectrisSource, MessageError

log = logging.getLogger(__name__)

# pvData ScalarType codes, as areaDetector puts the original type in codec.parameters of compressed arrays.
SCALAR_TYPES = {1: "i1", 2: "<i2", 3: "<i4", 4: "<i8", 5: "u1", 6: "<u2", 7: "<u4", 8: "<u8", 9: "<f4", 10: "<f8"}
MEMBERS = {"byteValue": "i1", "ubyteValue": "u1", "shortValue": "<i2", "ushortValue": "<u2", "intValue": "<i4",
           "uintValue": "<u4", "longValue": "<i8", "ulongValue": "<u8", "floatValue": "<f4", "doubleValue": "<f8"}


class NtFrame(NamedTuple):
    unique_id: int
    shape: tuple[int, int]  # numpy (ny, nx): dimension[0] is x, the fast axis
    dtype: np.dtype
    codec: str
    payload: Any
    t_detector: float


def _array(value: Any) -> tuple[str | None, np.ndarray]:
    """The union `value` as (member name or None, 1-D array), whatever shape the client library gives it."""
    if isinstance(value, (tuple, list)) and len(value) == 1:  # pvapy wraps a union in a 1-tuple
        value = value[0]
    if isinstance(value, Mapping):
        if len(value) != 1:
            raise MessageError("garbage", f"NTNDArray value union with {len(value)} members")
        name, value = next(iter(value.items()))
        return str(name), np.asarray(value).reshape(-1)
    return None, np.asarray(value).reshape(-1)


def ntnd_frame(rec: Mapping[str, Any]) -> NtFrame:
    """Decode the fields of one NTNDArray (as a plain mapping) into what land() needs; nothing evaluated."""
    try:
        member, arr = _array(rec["value"])
        dims = [int(d["size"]) for d in rec["dimension"]]
        uid = int(rec.get("uniqueId", 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise MessageError("garbage", f"not an NTNDArray ({exc})") from None
    if len(dims) != 2 or min(dims) < 1:
        raise MessageError("wrong_size", f"NTNDArray with dimensions {dims}: only 2-D mono frames are landed")
    shape = (dims[1], dims[0])
    codec_f = rec.get("codec") or {}
    name = str(codec_f.get("name", "") or "")
    ts = rec.get("dataTimeStamp") or {}
    t = float(ts.get("secondsPastEpoch", math.nan)) + 1e-9 * float(ts.get("nanoseconds", 0))
    if not name:
        dtype = np.dtype(MEMBERS.get(member or "", arr.dtype.str))
        if arr.size != shape[0] * shape[1] or arr.dtype.itemsize != dtype.itemsize:
            raise MessageError("wrong_size", f"NTNDArray of {arr.size} {arr.dtype} for {shape} {dtype}")
        return NtFrame(uid, shape, dtype, RAW, np.ascontiguousarray(arr).view(np.uint8), t)
    params = codec_f.get("parameters")
    if isinstance(params, Mapping):
        params = params.get("value")
    if isinstance(params, (tuple, list)) and params:
        params = params[0]
    code = SCALAR_TYPES.get(params) if isinstance(params, int) else None
    nbytes = int(rec.get("uncompressedSize", 0) or 0)
    if code is None:  # older IOCs: infer an unsigned type from the uncompressed size
        per = nbytes // (shape[0] * shape[1]) if nbytes else 0
        code = {1: "u1", 2: "<u2", 4: "<u4"}.get(per)
        if code is None:
            raise MessageError("wrong_dtype", f"compressed NTNDArray without its original type (codec {name})")
    dtype = np.dtype(code)
    data = np.ascontiguousarray(arr).view(np.uint8)
    if name == "bslz4":
        codec = BSLZ4
        head = bytes(data[:12])
        if len(head) < 12 or struct.unpack(">Q", head[:8])[0] != shape[0] * shape[1] * dtype.itemsize:
            # ADEiger strips the 12-byte chunk header; put it back (one copy of the compressed bytes).
            data = struct.pack(">QI", shape[0] * shape[1] * dtype.itemsize, BLOCK_BYTES) + data.tobytes()
    elif name == "lz4hdf5":
        codec = LZ4
    elif name == "lz4":
        codec = LZ4_BLOCK
    else:
        raise MessageError("unsupported_encoding", f"NTNDArray codec {name[:20]!r} (landed: bslz4, lz4, lz4hdf5)")
    return NtFrame(uid, shape, dtype, codec, data, t)


class PvaSource(DectrisSource):
    """Monitors an NTNDArray PV (e.g. `13EIG1:Pva1:Image`) and lands its frames; p4p or pvapy, whichever exists.

    frame_id = uniqueId − `first_unique_id` (areaDetector counts from 1), so positions join by scan index;
    a uniqueId that restarts at first_unique_id begins a new series. Updates that arrive while `queue_size`
    frames wait are dropped and counted (PVA monitors lose frames silently otherwise: uniqueId gaps).
    Loopback: EPICS_PVA_ADDR_LIST=127.0.0.1 EPICS_PVA_AUTO_ADDR_LIST=NO.
    """

    name = "pva"

    def __init__(self, channel: str, *args: Any, provider: str = "auto", first_unique_id: int = 1,
                 queue_size: int = 64, **kwargs: Any):
        super().__init__(f"pva://{channel}", *args, **kwargs)
        if provider not in ("auto", "p4p", "pvapy"):
            raise ValueError(f"provider must be 'auto', 'p4p' or 'pvapy', got {provider!r}")
        self.channel, self.provider, self.first_unique_id = channel, provider, first_unique_id
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._series = 0

    @classmethod
    def _library(cls, provider: str = "auto") -> str:
        for lib, module in (("p4p", "p4p.client.thread"), ("pvapy", "pvaccess")):
            if provider in ("auto", lib):
                try:
                    __import__(module)
                    return lib
                except ImportError:
                    continue
        raise SourceUnavailable(cls.name, "neither p4p nor pvapy (module pvaccess) is installed",
                                "pip install p4p   (or: pip install pvapy)")

    @classmethod
    def probe(cls) -> None:
        cls._library()

    def _on_update(self, value: Any) -> None:
        try:
            self._queue.put_nowait(value)
        except queue.Full:
            self.stats.sent += 1
            self.stats.dropped += 1
            self.issues("client_queue_full", f"{self.channel}: receiver behind, monitor update dropped")

    def _subscribe(self, lib: str) -> Any:
        if lib == "p4p":
            from p4p.client.thread import Context

            ctx = Context("pva", unwrap=False)
            sub = ctx.monitor(self.channel, self._on_update, notify_disconnect=False)
            return lambda: (sub.close(), ctx.close())
        import pvaccess

        chan = pvaccess.Channel(self.channel)
        chan.monitor(self._on_update, "field()")
        return lambda: chan.stopMonitor()

    @staticmethod
    def to_record(value: Any) -> Mapping[str, Any]:
        """A p4p Value or pvapy PvObject (or a plain dict, in tests) as a mapping of NTNDArray fields."""
        if isinstance(value, Mapping):
            return value
        for method in ("todict", "get"):  # p4p Value.todict(); pvapy PvObject.get()
            fn = getattr(value, method, None)
            if callable(fn):
                out = fn()
                if isinstance(out, Mapping):
                    return out
        raise MessageError("garbage", f"monitor update of type {type(value).__name__}")

    def handle(self, message: Any) -> None:
        f = ntnd_frame(self.to_record(message))
        frame_id = f.unique_id - self.first_unique_id
        if self.series_id is None:
            self.begin_series(self._series)
        elif frame_id == 0 and self._tracker.last >= 0:  # uniqueId restarted: the IOC began a new acquisition
            self.end_series(self.series_id)
            self._series += 1
            self.begin_series(self._series)
        self.land(self._series, frame_id, f.shape, f.dtype.newbyteorder("="), f.codec, f.payload, None,
                  f.t_detector)

    def _receive(self, sock: Any) -> Any:  # not a socket source: run() below pulls from the monitor queue
        raise NotImplementedError

    def run(self, ring: RingWriter, stop: threading.Event) -> SourceStats:
        lib = self._library(self.provider)
        self.attach(ring, stop)
        unsubscribe = self._subscribe(lib)
        try:
            while not stop.is_set():
                try:
                    item = self._queue.get(timeout=0.1)
                except queue.Empty:
                    continue
                self.handle_safely(item)
        except RingClosed:
            log.info("%s: ring closed by its owner", self.name)
        finally:
            unsubscribe()
            self.detach()
            if self.series_id is not None:
                self._mark_end(self.series_id)
            if self.close_at_end:
                ring.close_input()
        return self.stats
