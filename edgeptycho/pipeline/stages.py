"""Pipeline stages after inference, as threads joined by bounded ports: postprocess + sinks, monitor, writer.

Data flow (each arrow a Port): batcher ─► InferStage (infer.py) ─► PostStage ─► pool (slot recycled)
                                                             └─► SeriesWriter (end of scan: stitch + CXI)
MonitorStage publishes the live mosaic and the status beside them. ZeroMQ sockets are not thread-safe, so
every use of the one Publisher is serialised by `pub_lock` (a lock is the full memory barrier ZeroMQ asks
for when a socket changes threads); expensive work (snapshots, JSON) happens outside it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .batcher import BatchPool, BatchSlot, Port
from .stitcher import LiveStitcher, StitchResult, canvas_for, stitch
from .telemetry import Telemetry

log = logging.getLogger(__name__)


@dataclass
class Geometry:
    """Where patches land: canvas (H, W) in patch pixels, its origin (object pixel of canvas (0, 0)), pixel m;
    and whether the mosaics have the global phase ramp removed (stitch.remove_ramp)."""

    canvas: tuple[int, int] | None  # None: centred on the first patch, `auto_canvas` across
    origin_px: tuple[int, int] = (0, 0)
    pixel_m: float = math.nan
    factor: float = 1.0  # patch pixel ÷ full-frame object pixel (PreprocessSpec.pixel_size_factor)
    auto_canvas: int = 1024
    auto: bool = False  # canvas placed per series on its first patch (scan extent unknown in advance)
    remove_ramp: bool = False

    def positions(self, meta: np.ndarray) -> np.ndarray:
        """Patch-pixel positions (n, 2) of ring metadata; from metres where pixels are missing."""
        pos = meta["position_px"].copy()
        if math.isfinite(self.pixel_m):
            missing = ~np.isfinite(pos).all(axis=1)
            if missing.any():
                pos[missing] = meta["position_m"][missing] / (self.pixel_m / self.factor)
        return pos / self.factor


@dataclass
class SeriesRecord:
    """Everything kept of one series for its final reconstruction: patches, positions, frame ids."""

    series_id: int
    amplitude: list[np.ndarray] = field(default_factory=list)
    phase: list[np.ndarray] = field(default_factory=list)
    meta: list[np.ndarray] = field(default_factory=list)
    residual: list[np.ndarray] = field(default_factory=list)  # per batch, NaN where not checked (σ map)
    n: int = 0
    truncated: bool = False
    stitcher: LiveStitcher | None = None


class PostStage:
    """Postprocess and sinks: publish patch messages, stamp latencies, stitch live, keep patches for the CXI."""

    def __init__(self, inp: Port, pool: BatchPool, telemetry: Telemetry, weight: np.ndarray,
                 geometry: Geometry, publisher: Any = None, pub_lock: threading.Lock | None = None,
                 writer: Port | None = None, keep_max: int = 16384, stop: threading.Event | None = None):
        self.inp, self.pool, self.telemetry, self.weight, self.geometry = inp, pool, telemetry, weight, geometry
        self.publisher, self.pub_lock = publisher, pub_lock or threading.Lock()
        self.writer, self.keep_max, self.stop = writer, keep_max, stop or threading.Event()
        self.m = int(weight.shape[-1])
        self.series: SeriesRecord | None = None
        self.counters = {"published": 0, "publish_dropped": 0, "unplaced": 0, "series": 0, "errors": 0}
        self._ended: dict[int, LiveStitcher] = {}  # the last few ended series' mosaics (stitcher_for)
        self.last_error = ""

    @property
    def stitcher(self) -> LiveStitcher | None:
        s = self.series
        return None if s is None else s.stitcher

    def stitcher_for(self, series_id: int) -> LiveStitcher | None:
        """That series' live mosaic: the current one, or one of the last few ended (refinements of a series
        may finish after this stage has moved on to the next); None before its first patch is placed."""
        s = self.series
        if s is not None and s.series_id == series_id:
            return s.stitcher
        return self._ended.get(series_id)

    def _new_stitcher(self, pos: np.ndarray) -> LiveStitcher:
        g = self.geometry
        if g.canvas is None:  # unknown scan extent: centre a canvas on the first placed patch
            g.auto = True
            first = pos[np.isfinite(pos).all(axis=1)][0]
            g.origin_px = (int(first[0]) - g.auto_canvas // 2, int(first[1]) - g.auto_canvas // 2)
            g.canvas = (g.auto_canvas, g.auto_canvas)
        return LiveStitcher(g.canvas, self.m, self.weight, origin_px=g.origin_px, remove_ramp=g.remove_ramp)

    def _handle(self, slot: BatchSlot) -> None:
        n = slot.n
        meta = slot.meta[:n]
        amp = slot.outputs["amplitude"][:n, 0]
        phase = slot.outputs["phase"][:n, 0]
        sid = int(meta["series_id"][0])
        if self.series is not None and self.series.series_id != sid:
            self._end_series(self.series.series_id)  # a new series without an end marker closes the last one
        if self.series is None:
            self.series = SeriesRecord(sid)
            self.counters["series"] += 1
        if self.publisher is not None:
            t_inf = self.telemetry.wall.to_unix(slot.t_inferred)
            res = slot.extra.get("residual")  # QualityStage's, when it runs (NaN: not checked)
            with self.pub_lock:
                sent = self.publisher.publish_patches(meta, amp, phase, t_inf,
                                                      None if res is None else {"residual": res[:n]})
            self.counters["published"] += sent
            self.counters["publish_dropped"] += n - sent
        self.telemetry.published(slot.seq[:n], t_detector=meta["t_detector"])
        rec = self.series
        pos = self.geometry.positions(meta)
        ok = np.isfinite(pos).all(axis=1)
        rq = slot.extra.get("residual")  # the uncertainty map's residual term (NaN: frame not checked)
        rq = None if rq is None else rq[:n]
        if ok.any():
            if rec.stitcher is None:
                rec.stitcher = self._new_stitcher(pos)
            if ok.all():
                rec.stitcher.add_batch(amp, phase, pos, rq)
            else:
                rec.stitcher.add_batch(amp[ok], phase[ok], pos[ok], None if rq is None else rq[ok])
        self.counters["unplaced"] += int(n - ok.sum())
        if self.writer is not None:
            if rec.n + n <= self.keep_max:
                rec.amplitude.append(amp.copy())  # outputs are recycled with the slot; keep our own copy
                rec.phase.append(phase.copy())
                rec.meta.append(meta.copy())
                rec.residual.append(np.full(n, np.nan, np.float32) if rq is None else rq.astype(np.float32))
                rec.n += n
            elif not rec.truncated:
                rec.truncated = True
                log.warning("series %d: more than %d frames; the final CXI uses the live mosaic",
                            rec.series_id, self.keep_max)

    def _end_series(self, series_id: int | None) -> None:
        rec = self.series
        if rec is not None and rec.stitcher is not None:
            self._ended[rec.series_id] = rec.stitcher
            while len(self._ended) > 4:
                self._ended.pop(next(iter(self._ended)))
        if rec is not None and self.writer is not None:
            self.writer.put(rec)
        self.series = None
        if self.geometry.auto:  # the next scan gets its own canvas, centred on its first patch
            self.geometry.canvas = None

    def run(self) -> None:
        while True:
            slot = self.inp.get(self.stop)
            if slot is None:
                return
            try:
                if slot.n:
                    self._handle(slot)
                if slot.end_series is not None or slot.closed:
                    self._end_series(slot.end_series)
            except Exception as exc:  # one bad batch (a sink error) must not stop the service
                log.exception("postprocessing a batch of %d frames failed", slot.n)
                self.counters["errors"] += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
            finally:
                closed = slot.closed
                self.pool.put(slot)
            if closed:
                if self.writer is not None:
                    self.writer.put(None)  # tells the writer the stream is over
                return


class SeriesWriter:
    """End of a series: offline stitch of every kept patch (lsq offsets, sub-pixel) → callback (CXI, mosaic)."""

    def __init__(self, inp: Port, weight: np.ndarray, geometry: Geometry,
                 on_result: Callable[[SeriesRecord, StitchResult], None], stop: threading.Event | None = None):
        self.inp, self.weight, self.geometry, self.on_result = inp, weight, geometry, on_result
        self.stop = stop or threading.Event()
        self.results: dict[int, StitchResult] = {}
        self.errors: list[str] = []

    def finalize(self, rec: SeriesRecord) -> StitchResult | None:
        if rec.n and not rec.truncated:
            meta = np.concatenate(rec.meta)
            pos = self.geometry.positions(meta)
            ok = np.isfinite(pos).all(axis=1)
            if not ok.any():
                return None
            amp, ph = np.concatenate(rec.amplitude)[ok], np.concatenate(rec.phase)[ok]
            rq = np.concatenate(rec.residual)[ok] if len(rec.residual) == len(rec.amplitude) else None
            if rec.stitcher is not None:  # the same canvas as the live mosaic
                return stitch(amp, ph, pos[ok], self.weight, rec.stitcher.shape, origin_px=rec.stitcher.origin_px,
                              residual=rq, remove_ramp=self.geometry.remove_ramp)
            shape, origin = canvas_for(pos[ok], self.weight.shape[-1])
            return stitch(amp, ph, pos[ok], self.weight, shape, origin_px=origin, residual=rq,
                          remove_ramp=self.geometry.remove_ramp)
        if rec.stitcher is not None:
            return rec.stitcher.result()
        return None

    def run(self) -> None:
        while True:
            rec = self.inp.get(self.stop)
            if rec is None:
                return
            try:
                result = self.finalize(rec)
                if result is not None:
                    self.results[rec.series_id] = result
                    self.on_result(rec, result)
                elif rec.n:
                    log.warning("series %d: %d frames without scan positions: no mosaic or CXI written",
                                rec.series_id, rec.n)
            except Exception as exc:  # a failed write must not take the service down
                log.exception("series %d: final reconstruction failed", rec.series_id)
                self.errors.append(f"series {rec.series_id}: {exc}")


def publish_mosaic(publisher: Any, lock: threading.Lock, amplitude: np.ndarray, phase: np.ndarray,
                   origin_px: tuple[int, int], geometry: Geometry, n_frames: int, max_px: int = 1024,
                   extra: dict[str, Any] | None = None, uncertainty: np.ndarray | None = None) -> bool:
    """Send one `mosaic` message (decimated to at most `max_px` a side) under `lock`; ZeroMQ copies the data."""
    step = max(1, math.ceil(max(amplitude.shape) / max_px))
    if step > 1:  # a display stream: decimate big canvases rather than flood the subscribers
        amplitude, phase = amplitude[::step, ::step], phase[::step, ::step]
        uncertainty = None if uncertainty is None else uncertainty[::step, ::step]
    pixel = geometry.pixel_m
    finite = math.isfinite(pixel)
    origin = [v * pixel if finite else 0.0 for v in origin_px]
    with lock:
        return publisher.publish_mosaic(amplitude, phase, origin, pixel * step if finite else 0.0, n_frames,
                                        extra={"decimation": step, **(extra or {})},
                                        extra_arrays=None if uncertainty is None else {"uncertainty": uncertainty})


class MonitorStage:
    """Publishes the live mosaic at `mosaic_hz` (only when it changed) and the status at `status_hz`."""

    def __init__(self, post: PostStage, status: Callable[[], dict[str, Any]], publisher: Any,
                 pub_lock: threading.Lock, mosaic_hz: float = 10.0, status_hz: float = 1.0,
                 mosaic_max_px: int = 512, done: threading.Event | None = None):
        self.post, self.status, self.publisher, self.pub_lock = post, status, publisher, pub_lock
        self.mosaic_period = 1.0 / mosaic_hz if mosaic_hz > 0 else math.inf
        self.status_period = 1.0 / status_hz if status_hz > 0 else math.inf
        self.mosaic_max_px = mosaic_max_px
        self.done = done or threading.Event()
        self.mosaics = self.statuses = 0
        self._last_n = -1

    def publish_mosaic(self, stitcher: LiveStitcher) -> bool:
        amp, phase = stitcher.snapshot_amp_phase(copy=False)  # only this thread reads them until next call
        ok = publish_mosaic(self.publisher, self.pub_lock, amp, phase, stitcher.origin_px,
                            self.post.geometry, stitcher.n_added, self.mosaic_max_px,
                            uncertainty=stitcher.snapshot_sigma())
        self.mosaics += int(ok)
        return ok

    def run(self) -> None:
        next_m = next_s = time.perf_counter()
        while not self.done.is_set():
            now = time.perf_counter()
            if now >= next_m:
                next_m = now + self.mosaic_period
                st = self.post.stitcher
                if st is not None and st.n_added != self._last_n:
                    self._last_n = st.n_added
                    self.publish_mosaic(st)
            if now >= next_s:
                next_s = now + self.status_period
                status = self.status()
                with self.pub_lock:
                    self.statuses += int(self.publisher.publish_status(status))
            self.done.wait(max(min(next_m, next_s) - time.perf_counter(), 0.001))
