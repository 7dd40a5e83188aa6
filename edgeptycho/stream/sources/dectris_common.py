"""What the DECTRIS stream v1 and v2 receivers share: the PULL loop, error counters, series tracking, landing."""

from __future__ import annotations

import abc
import collections
import logging
import math
import threading
import time
from typing import Any

import numpy as np

from ..codecs import CodecError, decode_into
from ..positions import PositionTable
from ..ring import RingClosed
from .base import RingWriter, Source, SourceStats

log = logging.getLogger(__name__)

# Kinds that cost a frame or a message (summed into stats.malformed) …
FATAL = ("garbage", "unknown_type", "truncated", "wrong_size", "wrong_dtype", "bad_compression",
         "unsupported_encoding", "missing_channel", "repeated_frame", "bad_frame_id", "hash_mismatch",
         "internal_error")
# … and irregularities that are survived with the frame kept.
NOTES = ("out_of_order", "missing_header", "series_restarted", "unexpected_end", "no_cbor_magic",
         "client_queue_full")
_NAN2 = (math.nan, math.nan)
_KEEP_MASKS = 16  # series whose masks are remembered (frames of older ones left the ring long ago)


class MessageError(ValueError):
    """A message that cannot be used; `kind` is one of FATAL (the counter it lands in)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class KindCounter:
    """Counts irregularities by kind; logs the first of each kind, then one summary per kind per interval."""

    def __init__(self, name: str, interval_s: float = 10.0):
        self.name, self.interval_s = name, interval_s
        self.counts: dict[str, int] = {}
        self._last: dict[str, float] = {}
        self._since: dict[str, int] = {}

    def __call__(self, kind: str, detail: str) -> None:
        n = self.counts[kind] = self.counts.get(kind, 0) + 1
        now = time.monotonic()
        if n == 1:
            log.warning("%s: %s [%s; further ones summarised every %.0f s]", self.name, detail, kind, self.interval_s)
            self._last[kind], self._since[kind] = now, 0
        elif now - self._last[kind] >= self.interval_s:
            log.warning("%s: %d more %s in %.0f s (latest: %s)", self.name, self._since[kind] + 1, kind,
                        now - self._last[kind], detail)
            self._last[kind], self._since[kind] = now, 0
        else:
            self._since[kind] += 1


class SeriesTracker:
    """Frame ids seen in the current series: flags repeats, out-of-order arrivals and absurd ids."""

    def __init__(self, max_id: int = 1 << 24):
        self.max_id = max_id
        self.reset()

    def reset(self) -> None:
        self._seen = bytearray(1024)
        self.last = -1

    def check(self, frame_id: int) -> str | None:
        """A FATAL kind for an unusable id, "out_of_order" for a late one, None when in order."""
        if not 0 <= frame_id < self.max_id:
            return "bad_frame_id"
        if frame_id < len(self._seen) and self._seen[frame_id]:
            return "repeated_frame"
        return "out_of_order" if frame_id < self.last else None

    def mark(self, frame_id: int) -> None:
        if frame_id >= len(self._seen):
            self._seen.extend(bytes(max(frame_id + 1, 2 * len(self._seen)) - len(self._seen)))
        self._seen[frame_id] = 1
        self.last = max(self.last, frame_id)

    def unmark(self, frame_id: int) -> None:
        """A frame that failed to decode: its id may still arrive intact."""
        if frame_id < len(self._seen):
            self._seen[frame_id] = 0


class DectrisSource(Source):
    """A ZeroMQ PULL client of a DECTRIS detector (or simulator); subclasses parse one protocol version.

    Decoded pixels go straight into ring slots (0 copies with a compressed payload and a matching dtype;
    1 copy for raw payloads or a widening dtype conversion, counted in `landing`). The series' pixel mask,
    flatfield and countrate table are exposed as `mask`, `flatfield`, `countrate_table` (None until a header
    with header_detail "all" arrives), the detector configuration as `detector_config`.
    """

    default_port = 0

    def __init__(self, endpoint: str | None = None, frame_shape: tuple[int, int] | None = None,
                 dtype: Any = None, positions: PositionTable | None = None, max_series: int | None = None,
                 rcvhwm: int = 2000, idle_timeout_s: float | None = None, close_at_end: bool = True,
                 log_interval_s: float = 10.0, decode_threads: int = 0):
        super().__init__()
        if decode_threads < 0:
            raise ValueError(f"decode_threads must be >= 0, got {decode_threads}")
        self.endpoint = endpoint or f"tcp://127.0.0.1:{self.default_port}"
        self._spec = None
        if frame_shape is not None:
            if len(frame_shape) != 2 or min(frame_shape) < 1:
                raise ValueError(f"frame_shape must be (height, width), got {frame_shape}")
            self._spec = ((int(frame_shape[0]), int(frame_shape[1])), np.dtype(dtype or "uint32"))
        if max_series is not None and max_series < 1:
            raise ValueError(f"max_series must be >= 1 or None, got {max_series}")
        self.positions, self.max_series, self.rcvhwm = positions, max_series, int(rcvhwm)
        self.idle_timeout_s, self.close_at_end = idle_timeout_s, close_at_end
        self.issues = KindCounter(f"{self.name} {self.endpoint}", log_interval_s)
        self.landing = {"direct": 0, "copied": 0}
        self.mask: np.ndarray | None = None
        # Mask in effect per series, recorded at each header: frames of an earlier series may still be
        # waiting in the ring when the next series' header (with a new mask) arrives.
        self._series_masks: collections.OrderedDict[int, np.ndarray | None] = collections.OrderedDict()
        self.flatfield: np.ndarray | None = None
        self.countrate_table: np.ndarray | None = None
        self.detector_config: dict[str, Any] = {}
        self.header_event = threading.Event()  # set when a series header has been received
        self.series_id: int | None = None  # series in progress (None: between series)
        self.series_done = 0
        self._tracker = SeriesTracker()
        self._scratch = threading.local()  # per decode thread: widening conversions decode here first
        self._ring: RingWriter | None = None
        self._stop = threading.Event()
        # decode_threads > 0: the receive thread parses and hands frames to a pool (the decoders release the
        # GIL), so decoding scales across cores; commits may then reorder by a few frames (ids tell).
        self.decode_threads, self._pool = decode_threads, None
        self._count_lock = threading.Lock()
        self._idle = threading.Condition()
        self._pending = 0

    @classmethod
    def probe(cls) -> None:
        try:
            import zmq  # noqa: F401
        except ImportError as exc:
            from .base import SourceUnavailable
            raise SourceUnavailable(cls.name, f"pyzmq is missing ({exc})", "pip install pyzmq") from None

    def frame_spec(self) -> tuple[tuple[int, int], np.dtype] | None:
        return self._spec

    def counters(self) -> dict[str, Any]:
        out: dict[str, Any] = self.stats.as_dict()
        out.update({f"issue.{k}": v for k, v in self.issues.counts.items()})
        out.update({f"landed.{k}": v for k, v in self.landing.items()})
        out["series_done"] = self.series_done
        return out

    # ---- the receive loop ----------------------------------------------------------------------------
    def run(self, ring: RingWriter, stop: threading.Event) -> SourceStats:
        import zmq

        self.attach(ring, stop)
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.RCVHWM, self.rcvhwm)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        last_msg = time.monotonic()
        try:
            while not stop.is_set() and not self._finished():
                if not sock.poll(100):
                    if self.idle_timeout_s is not None and time.monotonic() - last_msg > self.idle_timeout_s:
                        log.info("%s: no message for %.1f s; stopping", self.name, self.idle_timeout_s)
                        break
                    continue
                while not stop.is_set() and not self._finished():  # drain what is queued, one poll per burst
                    try:
                        parts = self._receive(sock)
                    except zmq.Again:
                        break
                    last_msg = time.monotonic()
                    self.handle_safely(parts)
        except RingClosed:
            log.info("%s: ring closed by its owner", self.name)
        finally:
            sock.close(0)
            self.detach()
            if self.close_at_end:
                ring.close_input()
        return self.stats

    def handle_safely(self, message: Any) -> None:
        """handle() with every failure but a closed ring counted by kind: no message ends the stream."""
        try:
            self.handle(message)
        except MessageError as exc:
            self._issue(exc.kind, str(exc))
        except RingClosed:
            raise
        except Exception as exc:  # a parser bug must not kill the receiver: count, log, go on
            self._issue("internal_error", f"{type(exc).__name__}: {exc}")

    def attach(self, ring: RingWriter, stop: threading.Event | None = None) -> None:
        """Bind to a ring without a socket (run() does this; tests feed handle() directly, then detach())."""
        self._ring, self._stop = ring, stop or threading.Event()
        if self.decode_threads and self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix=f"{self.name}-decode")

    def detach(self) -> None:
        """Wait for frames still decoding, then stop the decode pool."""
        self._drain()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _drain(self) -> None:
        with self._idle:
            while self._pending:
                self._idle.wait()

    def _mark_end(self, series_id: int) -> None:
        self._drain()  # every frame of the series is committed before its end marker
        ring = self._ring
        ring.mark_end(series_id)

    def _finished(self) -> bool:
        return self.max_series is not None and self.series_done >= self.max_series

    @abc.abstractmethod
    def _receive(self, sock: Any) -> Any:
        """One whole message from the socket without waiting (raises zmq.Again when none is queued)."""

    @abc.abstractmethod
    def handle(self, message: Any) -> None:
        """Parse one message and act on it; raise MessageError for an unusable one."""

    # ---- series bookkeeping --------------------------------------------------------------------------
    def _issue(self, kind: str, detail: str) -> None:
        with self._count_lock:
            self.issues(kind, detail)
            if kind in FATAL:
                self.stats.malformed += 1

    def begin_series(self, series_id: int) -> None:
        """A header/start message: close a series left open (restart without end) and start a new one."""
        if self.series_id is not None:
            self._issue("series_restarted", f"series {series_id} started before series {self.series_id} ended")
            self._mark_end(self.series_id)
        self.series_id = series_id
        self._tracker.reset()
        self.header_event.set()

    def remember_mask(self, series_id: int) -> None:
        """Record the mask now in effect (`mask`) as series `series_id`'s; call once its header is parsed."""
        self._series_masks[series_id] = self.mask
        while len(self._series_masks) > _KEEP_MASKS:
            self._series_masks.popitem(last=False)

    def mask_for(self, series_id: int) -> np.ndarray | None:
        return self._series_masks.get(series_id, self.mask)

    def end_series(self, series_id: int) -> None:
        if series_id != self.series_id:  # not ours to close: the next header closes an open series anyway
            self._issue("unexpected_end", f"end of series {series_id}, but the open series is {self.series_id}")
            return
        self._mark_end(series_id)
        self.series_id = None
        self.series_done += 1

    def _image_series(self, series_id: int) -> None:
        if series_id != self.series_id:  # an image of a series whose header we never saw: keep its frames
            self._issue("missing_header", f"image of series {series_id} without its header "
                        f"(open series: {self.series_id})")
            if self.series_id is not None:
                self._mark_end(self.series_id)
            self.series_id = series_id
            self._tracker.reset()

    # ---- landing a frame in its ring slot --------------------------------------------------------------
    def land(self, series_id: int, frame_id: int, shape: tuple[int, int], dtype: np.dtype, codec: str,
             payload: Any, elem_size: int | None = None, t_detector: float = math.nan) -> bool:
        """Decode one frame into a ring slot and commit it; a bad frame is counted and its slot given back."""
        ring = self._ring
        self._image_series(series_id)
        if tuple(shape) != tuple(ring.frame_shape):
            raise MessageError("wrong_size", f"frame {frame_id} is {shape[0]}x{shape[1]} but the ring slots are "
                               f"{ring.frame_shape[0]}x{ring.frame_shape[1]} (set the source's frame_shape)")
        direct = dtype == ring.dtype
        if not direct and not np.can_cast(dtype, ring.dtype, "safe"):
            raise MessageError("wrong_dtype", f"frame {frame_id} is {dtype}, not storable in {ring.dtype} slots")
        verdict = self._tracker.check(frame_id)
        if verdict in FATAL:
            raise MessageError(verdict, f"frame id {frame_id} of series {series_id}: {verdict.replace('_', ' ')}")
        slot = ring.acquire_write(stop=self._stop)
        self._tracker.mark(frame_id)  # at hand-off, so a duplicate is caught even while the first decodes
        if slot is None:
            ring.drop(frame_id)
            with self._count_lock:
                self.stats.sent += 1
                self.stats.dropped += 1
            return False
        if verdict is not None:
            self._issue(verdict, f"frame {frame_id} arrived after frame {self._tracker.last}")
        job = (slot, series_id, frame_id, shape, dtype, codec, payload, elem_size, t_detector, direct)
        if self._pool is None:
            self._finish(*job)
            return True
        with self._idle:
            self._pending += 1
        self._pool.submit(self._finish_async, job)
        return True

    def _finish(self, slot: int, series_id: int, frame_id: int, shape: tuple[int, int], dtype: np.dtype,
                codec: str, payload: Any, elem_size: int | None, t_detector: float, direct: bool) -> None:
        """Decode into the slot and commit it, or give the slot back and raise MessageError."""
        ring = self._ring
        try:
            if direct:
                copies = decode_into(codec, payload, ring.slot_view(slot), elem_size)
            else:  # widening (e.g. uint16 detector into uint32 slots): decode aside, convert once
                scratch = getattr(self._scratch, "a", None)
                if scratch is None or scratch.shape != tuple(shape) or scratch.dtype != dtype:
                    scratch = self._scratch.a = np.empty(shape, dtype)
                decode_into(codec, payload, scratch, elem_size)
                np.copyto(ring.slot_view(slot), scratch, casting="safe")
                copies = 1
        except CodecError as exc:
            ring.abort(slot)
            self._tracker.unmark(frame_id)
            raise MessageError(exc.kind, f"frame {frame_id} of series {series_id}: {exc}") from None
        except BaseException:
            ring.abort(slot)
            raise
        pos_px, pos_m = self.positions.get(frame_id) if self.positions is not None else (_NAN2, _NAN2)
        ring.commit(slot, frame_id, series_id=series_id, position_px=pos_px, position_m=pos_m,
                    t_detector=t_detector)
        with self._count_lock:
            self.landing["direct" if copies == 0 else "copied"] += 1
            self.stats.sent += 1
            self.stats.received += 1

    def _finish_async(self, job: tuple[Any, ...]) -> None:
        try:
            self._finish(*job)
        except MessageError as exc:
            self._issue(exc.kind, str(exc))
        except Exception as exc:  # counted, never lost silently in the pool
            self._issue("internal_error", f"{type(exc).__name__}: {exc}")
        finally:
            with self._idle:
                self._pending -= 1
                if not self._pending:
                    self._idle.notify_all()
