"""Batcher: leases committed ring frames, preprocesses them straight into the backend's input batch, flushes.

A batch is flushed when it is full, when its oldest frame has waited `max_wait_s` since it reached the ring
and the backend can start it at once, and at the end of every series (scan) — so the last partial batch of a
scan is always inferred (the prior code dropped up to 7 trailing frames). Past the deadline a busy backend
makes the batch keep growing instead of queueing early (a partial batch flushed to a busy device only waits
there): batches grow with the load, and a frame's wait is bounded by one inference of the batch before it.
Ring slots are released as soon as their frames are preprocessed.
Input batches come from a pool of preallocated BatchSlots (device-visible memory from backend.allocator()),
at least two, so batch k+1 fills while batch k infers.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeptycho.hw.base import Allocator, Backend, Ticket
from edgeptycho.model.preprocess import PreprocessSpec, preprocess_into
from edgeptycho.stream.ring import META_DTYPE, FrameRing, prefault

from .telemetry import Telemetry

log = logging.getLogger(__name__)

_POLL_S = 0.05  # how often blocked waits look at the stop event
_BUSY_POLL_S = 0.002  # past the deadline, backend busy: how often newly arrived frames are preprocessed
# Frames preprocessed per call: about 1 MiB of payload. Larger calls run out of cache and allocate temporaries
# big enough to be fresh mmaps (page faults on every call): 32 frames of 256² uint32 in one call took 89-221 µs
# per frame, 4-8 frames per call 39-53 µs (median of 15 interleaved rounds, loaded 2-core VM).
_CHUNK_BYTES = 1 << 20


@dataclass
class BatchSlot:
    """One preallocated batch: backend input and outputs, ring metadata and sequence numbers of its frames.

    n frames are valid. A slot with n == 0 carries only news: end of a series or end of the stream.
    """

    index: int
    inputs: np.ndarray
    outputs: dict[str, np.ndarray]
    meta: np.ndarray
    seq: np.ndarray
    n: int = 0
    end_series: int | None = None  # this batch closes series `end_series`
    closed: bool = False  # the stream is over: nothing follows this batch
    reason: str = ""  # why it was flushed: full | deadline | end | close
    ticket: Ticket | None = None
    t_flushed: float = 0.0
    t_submitted: float = 0.0
    t_inferred: float = 0.0  # perf_counter
    extra: dict[str, Any] = field(default_factory=dict)

    def reset(self) -> None:
        self.n, self.end_series, self.closed, self.reason, self.ticket = 0, None, False, "", None


class Port:
    """A named bounded FIFO between two stages (Holoscan-style explicit port); tracks its high-water mark."""

    def __init__(self, name: str, maxsize: int = 0):
        self.name = name
        self._q: queue.Queue[Any] = queue.Queue(maxsize)
        self.high_water = 0

    def put(self, item: Any) -> None:
        self._q.put(item)
        self.high_water = max(self.high_water, self._q.qsize())

    def get(self, stop: threading.Event | None = None) -> Any:
        """The next item; None when `stop` is set while waiting."""
        while True:
            try:
                return self._q.get(timeout=_POLL_S)
            except queue.Empty:
                if stop is not None and stop.is_set():
                    return None

    def empty(self) -> bool:
        return self._q.empty()

    def depth(self) -> int:
        return self._q.qsize()


class BatchPool:
    """`size` BatchSlots allocated once; free slots wait in a port (an empty pool is backpressure)."""

    def __init__(self, backend: Backend, size: int = 4, allocator: Allocator | None = None):
        if size < 2:
            raise ValueError(f"batch pool needs >= 2 slots for double buffering, got {size}")
        self.allocator = allocator or backend.allocator()
        spec = backend.input_spec
        b = spec.shape[0]
        self.batch_size = b
        self.slots = [
            BatchSlot(i, self.allocator.empty(spec.shape, spec.dtype), backend.new_outputs(self.allocator),
                      np.zeros(b, META_DTYPE), np.zeros(b, np.int64))
            for i in range(size)
        ]
        for s in self.slots:  # resident now: first-touch faults would land in the batcher and inside the backend
            prefault(s.inputs)
            for out in s.outputs.values():
                prefault(out)
        self._free = Port("free")
        for s in self.slots:
            self._free.put(s)

    def get(self, stop: threading.Event | None = None) -> BatchSlot | None:
        """A free slot; None if `stop` is set while waiting."""
        return self._free.get(stop)

    def put(self, slot: BatchSlot) -> None:
        slot.reset()
        self._free.put(slot)

    @property
    def free(self) -> int:
        return self._free.depth()


def detector_roi(frame: tuple[int, int], size: int, center: tuple[float, float] | None = None
                 ) -> tuple[int, int, int] | None:
    """(row, col, size) of the model-sized square of a larger detector frame centred on `center` (the direct
    beam, detector pixels; default the frame's centre), or None when the frame is that size already.

    The square's own centre pixel (size // 2, where zero frequency sits in the model's frames) lands on the
    rounded `center`. A frame smaller than the model's, or a square reaching past the frame, is an error
    that names the setting (source.roi_center).
    """
    h, w = (int(v) for v in frame)
    if (h, w) == (size, size):
        return None
    if h < size or w < size:
        raise ValueError(f"detector frames {h}x{w} are smaller than the model's {size}x{size} frames")
    cy, cx = (h // 2, w // 2) if center is None else center  # zero frequency sits at index h//2 by default
    r0, c0 = int(round(cy)) - size // 2, int(round(cx)) - size // 2
    if r0 < 0 or c0 < 0 or r0 + size > h or c0 + size > w:
        raise ValueError(f"source.roi_center {[cy, cx]}: a {size}x{size} region around it leaves the {h}x{w} "
                         f"frame (rows {r0}..{r0 + size}, cols {c0}..{c0 + size})")
    return r0, c0, size


class Batcher:
    """Ring → preprocess into pooled input batches → `out` port. Run `run()` in its own thread.

    Counters: frames, batches, flushes by reason, payload_writes (frames written into an input batch: the one
    copy a frame's payload undergoes after landing in the ring) and gathers (frames copied to make a batch
    contiguous before preprocessing; zero because ring.segments hands out slab views).
    """

    def __init__(self, ring: FrameRing, pool: BatchPool, out: Any, spec: PreprocessSpec,
                 telemetry: Telemetry, max_wait_s: float = 0.005, mask: np.ndarray | None = None,
                 scale: float = 1.0, stop: threading.Event | None = None,
                 gate: Any = None, roi: tuple[int, int, int] | None = None):
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.ring, self.pool, self.out, self.spec = ring, pool, out, spec
        self.telemetry, self.max_wait_s, self.mask, self.scale = telemetry, float(max_wait_s), mask, scale
        self.stop = stop or threading.Event()  # hard stop: quit without draining
        # `gate` (the InferStage): ready() → a flushed batch would start at once; wait_ready(timeout).
        self.gate = gate
        # (row, col, size): the model reads this square of each (larger) detector frame, through a view of
        # the ring slot, so the region costs no copy; masks are cut to it too (detector_roi)
        self.roi = roi
        # Without a fixed mask: mask_provider(series_id) gives each series' detector mask (a DECTRIS series
        # header carries it, and the next series may bring another). Looked up once per series.
        self.mask_provider: Any = None
        self._mask_series: int | None = None
        self._series_mask: np.ndarray | None = None
        # tap(slot, row, frames): sees raw ring frames before their slots are released (pipeline.trust)
        self.tap: Any = None
        self.batch_size = pool.batch_size
        self.chunk = max(1, _CHUNK_BYTES // max(ring.slot_nbytes, 1))  # frames per preprocess call
        self.seq = 0
        self.counters = {"frames": 0, "batches": 0, "full": 0, "deadline": 0, "end": 0, "close": 0,
                         "payload_writes": 0, "gathers": 0, "torn": 0}

    def _fill(self, slot: BatchSlot, batch: Any, at: int) -> int:
        """Preprocess a leased FrameBatch into slot rows at.., record metadata, release the ring slots."""
        k = len(batch)
        c = self.chunk
        for i, j, view, mask in self._runs(batch):  # vectorised calls per run of consecutive slots
            for a in range(0, j - i, c):
                b = min(a + c, j - i)
                preprocess_into(view[a:b], slot.inputs[at + i + a:at + i + b], self.spec, mask, self.scale)
            if self.tap is not None:
                self.tap(slot, at + i, view)
        bad = k - int(np.count_nonzero(self.ring.verify(batch)))
        if bad:  # a cross-process producer rewrote a leased slot mid-read: the frame is torn (ring.lapped)
            self.counters["torn"] += bad
            log.warning("%d frame(s) overwritten by the producer while being preprocessed", bad)
        self.ring.release(batch.slots)
        self.counters["payload_writes"] += k
        slot.meta[at:at + k] = batch.meta
        seq = np.arange(self.seq, self.seq + k)
        self.seq += k
        slot.seq[at:at + k] = seq
        # t_received is the commit time into the ring: the frame's arrival at the service.
        self.telemetry.received(seq, batch.meta["t_received"])
        return k

    def mask_of(self, series_id: int) -> np.ndarray | None:
        """The mask applied to frames of `series_id`: the fixed one, else the provider's for that series."""
        if self.mask is not None or self.mask_provider is None:
            return self.mask
        if series_id != self._mask_series:
            self._series_mask, self._mask_series = self.mask_provider(series_id), series_id
        return self._series_mask

    def cut_mask(self, mask: np.ndarray | None) -> np.ndarray | None:
        """A full-frame detector mask as the model sees it (its region of interest)."""
        if self.roi is None or mask is None:
            return mask
        r, c, n = self.roi
        return mask[r:r + n, c:c + n]

    def _cut(self, view: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        if self.roi is not None:
            r, c, n = self.roi
            view = view[:, r:r + n, c:c + n]
        return view, self.cut_mask(mask)

    def _runs(self, batch: Any) -> list[tuple[int, int, np.ndarray, np.ndarray | None]]:
        """(i, j, slab view, mask) per run of consecutive slots of one series (usually one or two runs)."""
        sid = batch.meta["series_id"]
        runs = self.ring.segments(batch.slots)
        if sid[0] == sid[-1]:  # a take never crosses an end-of-series marker: the usual case
            mask = self.mask_of(int(sid[0]))
            return [(i, j, *self._cut(view, mask)) for i, j, view in runs]
        out = []
        cuts = (np.flatnonzero(np.diff(sid)) + 1).tolist()
        for i, j, view in runs:  # a series change without an end marker: split the runs there too
            edges = [i, *[c for c in cuts if i < c < j], j]
            out += [(a, b, *self._cut(view[a - i:b - i], self.mask_of(int(sid[a]))))
                    for a, b in zip(edges[:-1], edges[1:], strict=True)]
        return out

    def _flush(self, slot: BatchSlot, reason: str) -> None:
        slot.reason = reason
        slot.t_flushed = time.perf_counter()
        if slot.n:
            self.telemetry.stamp("batched", slot.seq[:slot.n], slot.t_flushed)
            self.counters["batches"] += 1
            self.counters["frames"] += slot.n
        self.counters[reason] += 1
        self.out.put(slot)

    def run(self) -> None:
        """Until the ring's input is closed and drained (or the hard stop): fill and flush batches."""
        B, ring = self.batch_size, self.ring
        try:
            while not self.stop.is_set():
                slot = self.pool.get(self.stop)
                if slot is None:
                    return
                deadline = None
                while True:
                    want = B - slot.n
                    if deadline is None:
                        fb = ring.take(want, timeout=_POLL_S, min_n=1)
                    elif time.perf_counter() < deadline:
                        fb = ring.take(want, timeout=max(deadline - time.perf_counter(), 0.0), min_n=want)
                    else:  # past the deadline with the backend busy: keep filling until it frees up
                        self.gate.wait_ready(_BUSY_POLL_S)
                        fb = ring.take(want, timeout=0.0, min_n=1)
                    if len(fb):
                        if deadline is None:
                            deadline = float(fb.meta["t_received"][0]) - self.telemetry.wall.offset + self.max_wait_s
                        slot.n += self._fill(slot, fb, slot.n)
                    if fb.end_series is not None:
                        slot.end_series = fb.end_series
                        self._flush(slot, "end")
                        break
                    if fb.closed:
                        slot.closed = True
                        self._flush(slot, "close")
                        return
                    if slot.n == B:
                        self._flush(slot, "full")
                        break
                    if deadline is not None and time.perf_counter() >= deadline and \
                            (self.gate is None or self.gate.ready()):
                        self._flush(slot, "deadline")
                        break
                    if self.stop.is_set():
                        return
        except Exception:
            log.exception("batcher failed")
            raise
