"""Trust in the live pipeline: per-patch forward residual, threshold fallback by region refinement, references.

Flow (docs/refinement.md, "Trust in the live pipeline"): the batcher's `tap` (QualityTap) copies one raw
frame in `quality.every` out of its ring slot before the slot is released, into the batch slot's own buffer;
QualityStage (its own thread, between inference and postprocessing) computes the ForwardResidual of those
frames against their CNN patches and writes `slot.extra["residual"]`, which PostStage publishes in each
patch message (NaN → null where a frame was not checked). The residual is defined on the raw counts, binned
to the e×e grid of the residual's window (e = 2M): the model input has each frame divided by its own mean
log value, which throws away the absolute scale the Fourier misfit needs. When the stage falls behind
(more than `max_backlog` batches waiting) it skips batches and the tap stops copying, so the hot path never
waits on it. Frames over `quality.threshold` queue their patch as a region; after `refine_delay` more frames
(its neighbours have arrived) or at the end of the series, the region is refined from the live mosaic with
pipeline.refine's sub_problem/solve_sub in a background thread or on Dask, pasted back into the live mosaic,
and into the final stitch of the series (apply_refined). Every `reference_every` frames a reference region
is refined with `reference_iters` iterations and scored (residual before/after, CNN vs refined NRMSE).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..physics.epie import EpieOptions
from ..physics.forward import bin_frames, binning_ramp, extract_patches
from .batcher import BatchSlot, Port
from .quality import ForwardResidual, QualityMonitor
from .refine import footprint_radius_px, solve_sub, sub_problem
from .score import DelayedScores
from .settings import QualityConfig

log = logging.getLogger(__name__)


class QualityTap:
    """Batcher hook: copies one frame in `every` from its ring slot into the batch slot before release."""

    def __init__(self, every: int, batch: int, frame: tuple[int, int], dtype: Any, busy: Any = None):
        self.every, self.batch, self.frame, self.dtype = int(every), int(batch), tuple(frame), np.dtype(dtype)
        self.busy = busy  # callable: True while the quality stage is behind (then nothing is copied)
        self.seen = self.copied = self.skipped = 0

    def __call__(self, slot: BatchSlot, row0: int, frames: np.ndarray) -> None:
        x = slot.extra
        if row0 == 0 or "q_rows" not in x:
            x["q_rows"] = []
        k = len(frames)
        idx = np.arange((-self.seen) % self.every, k, self.every)
        self.seen += k
        if not idx.size:
            return
        if self.busy is not None and self.busy():
            self.skipped += len(idx)
            return
        buf = x.get("q_buf")
        if buf is None:
            buf = x["q_buf"] = np.empty((self.batch, *self.frame), self.dtype)
        rows = x["q_rows"]
        j = len(rows)
        buf[j:j + len(idx)] = frames[idx]  # the sampled frames' one copy (counted apart from the payload's)
        rows.extend((row0 + idx).tolist())
        self.copied += len(idx)


@dataclass
class Region:
    """A patch-sized box of a series' canvas queued for refinement."""

    series_id: int
    centre: tuple[float, float]  # patch (object) pixels
    due: int  # frames of its series seen when it may run
    kind: str = "fallback"  # fallback | reference
    residual: float = math.nan
    stitcher: Any = None


class QualityStage:
    """Thread between InferStage and PostStage: residuals, fallback regions, references (module docstring)."""

    def __init__(self, inp: Port, out: Port, cfg: QualityConfig, probe: np.ndarray, m: int, frame: int,
                 geometry: Any, stitcher_of: Any, mask: np.ndarray | None = None,
                 stop: threading.Event | None = None):
        p = np.asarray(probe)
        p = p[None] if p.ndim == 2 else p
        if p.shape[-1] != frame:
            raise ValueError(f"probe window {p.shape[-1]} px differs from the frame {frame} px")
        e = min(2 * m, frame)
        while frame % e:  # the e-grid must be a binning of the frame
            e += 1
        self.inp, self.out, self.cfg, self.m, self.n, self.e = inp, out, cfg, int(m), int(frame), e
        # stitcher_of(series_id): that series' live mosaic, None before its first patch (PostStage.stitcher_for)
        self.geometry, self.stitcher_of = geometry, stitcher_of
        self.stop = stop or threading.Event()
        o = frame // 2 - e // 2
        self.probe = np.ascontiguousarray(p[:, o:o + e, o:o + e], np.complex64)
        self.mask = None if mask is None else bin_frames((np.asarray(mask) != 0).astype(np.float32), frame // e) > 0
        fr = ForwardResidual(self.probe, m, mask=self.mask, prebinned=frame // e)
        # the refinement solves the kept frames (binned to the window) with this probe (forward.binning_ramp)
        self.solve_probe = self.probe * binning_ramp(e, e, frame // e)
        # with a score (score_alpha > 0) the threshold applies to it, once the frame's neighbours are in the
        # mosaic; the residual monitor then only keeps the residuals' statistics
        self.scorer = DelayedScores(cfg.score_delay, cfg.score_alpha) if cfg.score_alpha > 0 else None
        self.monitor = QualityMonitor(fr, None if self.scorer else cfg.threshold, auto=False)
        self.scores = QualityMonitor(fr, cfg.threshold, auto=False)
        self.counters = {"checked": 0, "scored": 0, "over_threshold": 0, "skipped_batches": 0,
                         "regions_queued": 0, "regions_done": 0, "regions_failed": 0, "references_done": 0}
        self.refined: dict[int, list[tuple[tuple[int, int, int, int], np.ndarray]]] = {}
        self.last_refine: dict[str, Any] = {}
        self._pending: list[Region] = []
        self._series = None
        self._frames = 0  # frames of the current series seen so far, checked or not
        self._placeable = 0  # of them, those with a position (the post stage places them in the mosaic)
        self._store: tuple[np.ndarray, np.ndarray] | None = None  # (keep, e, e) frames, (keep, 2) positions
        self._stored = 0
        self._next_ref = cfg.reference_every or 0
        self._jobs: queue.Queue[Region | None] = queue.Queue()
        self._busy_series: dict[int, int] = {}
        self._cond = threading.Condition()
        self._client = None
        self._refiner = None
        if cfg.threshold is not None or cfg.reference_every:
            self._refiner = threading.Thread(target=self._refine_loop, name="pipeline-refine", daemon=True)
            self._refiner.start()

    # --- the stage ----------------------------------------------------------------------------------
    def backlogged(self) -> bool:
        return self.inp.depth() > self.cfg.max_backlog

    def run(self) -> None:
        try:
            while True:
                slot = self.inp.get(self.stop)
                if slot is None:
                    return
                ends, closed = slot.end_series is not None or slot.closed, slot.closed  # before the slot moves on
                try:
                    self._check(slot)
                except Exception:  # a quality failure must never stop the results
                    log.exception("quality check of a batch failed")
                sid = self._series if ends and self._refiner is not None else None
                if sid is not None:  # the series' final image (apply_refined) waits for its last regions too
                    with self._cond:
                        self._busy_series[sid] = self._busy_series.get(sid, 0) + 1
                self.out.put(slot)
                if ends:  # after passing the slot on: the series' last scores wait for its last patches
                    try:
                        self._end_series(wait_placed=True)
                    except Exception:
                        log.exception("quality: ending a series failed")
                    finally:
                        if sid is not None:
                            with self._cond:
                                self._busy_series[sid] -= 1
                                self._cond.notify_all()
                if closed:
                    return
        finally:
            self._jobs.put(None)

    def _check(self, slot: BatchSlot) -> None:
        x = slot.extra
        res = x.get("residual")
        if res is None:
            res = x["residual"] = np.empty(len(slot.meta), np.float32)
        res.fill(np.nan)
        rows = x.get("q_rows") if slot.n else None
        if slot.n:
            sid = int(slot.meta["series_id"][0])
            if sid != self._series:  # a new series without an end marker closes the last one
                self._end_series()
                self._series = sid
        if rows:
            x["q_rows"] = []
            if self.backlogged():
                self.counters["skipped_batches"] += 1
            else:
                self._residuals(slot, np.asarray(rows), res)
        self._frames += slot.n
        if slot.n and self.scorer is not None:
            self._placeable += int(np.isfinite(self.geometry.positions(slot.meta[:slot.n])).all(axis=1).sum())
        if self.scorer is not None and self._series is not None:
            self._score(final=False)
        if self._refiner is not None and self._series is not None:
            self._release(final=False)

    def _residuals(self, slot: BatchSlot, rows: np.ndarray, res: np.ndarray) -> None:
        frames = bin_frames(slot.extra["q_buf"][:len(rows)], self.n // self.e, dtype=np.float32)
        amp = slot.outputs["amplitude"][rows, 0]
        phase = slot.outputs["phase"][rows, 0]
        r, over = self.monitor.update(frames, amp, phase)
        res[rows] = r
        self.counters["checked"] += len(rows)
        sid = self._series
        pos = self.geometry.positions(slot.meta[rows])  # patch pixels; canvas origin: the stitcher's, later
        ok = np.isfinite(pos).all(axis=1)
        if self._refiner is not None:
            self._keep(frames[ok], pos[ok])
        due = self._frames + slot.n + self.cfg.refine_delay  # frames, as serve.yaml documents it
        if self.scorer is not None:  # flags come with the scores, once the neighbours are in the mosaic
            self.scorer.add(self._frames + rows[ok], amp[ok], phase[ok], pos[ok], r[ok],
                            [(sid, tuple(p), due) for p in pos[ok].tolist()])
        else:
            self.counters["over_threshold"] += int(over.sum())
            if self._refiner is not None:
                for i in np.flatnonzero(over & ok):
                    self._queue(Region(sid, tuple(pos[i]), due, residual=float(r[i])))
        if self._refiner is not None and self.cfg.reference_every and self.counters["checked"] >= self._next_ref \
                and ok.any():
            self._next_ref += self.cfg.reference_every
            i = int(np.flatnonzero(ok)[-1])
            self._queue(Region(sid, tuple(pos[i]), due, "reference", float(r[i])))

    def _score(self, final: bool) -> None:
        """Scores of the checked frames whose neighbours have arrived (all at the end); flagged → regions."""
        keys, _, _, score = self.scorer.collect(self.stitcher_of(self._series), final)
        if not keys:
            return
        flags = self.scores.judge(score)
        self.counters["scored"] += len(keys)
        self.counters["over_threshold"] += int(flags.sum())
        if self._refiner is not None:
            for i in np.flatnonzero(flags).tolist():
                sid, centre, due = keys[i]
                self._queue(Region(sid, centre, due, residual=float(score[i])))

    def _keep(self, frames: np.ndarray, pos: np.ndarray) -> None:
        if self._store is None:
            k = self.cfg.keep_frames
            self._store = (np.zeros((k, self.e, self.e), np.float32), np.full((k, 2), np.nan))
        f, p = self._store
        idx = (self._stored + np.arange(len(frames))) % len(f)  # a ring: the oldest checked frames make room
        f[idx] = frames
        p[idx] = pos
        self._stored += len(frames)

    def _queue(self, reg: Region) -> None:
        half = self.m / 2
        if any(q.series_id == reg.series_id and abs(q.centre[0] - reg.centre[0]) < half
               and abs(q.centre[1] - reg.centre[1]) < half for q in self._pending):
            return  # one refinement covers both
        self._pending.append(reg)
        self.counters["regions_queued"] += 1

    def _release(self, final: bool) -> None:
        if not final and self.stitcher_of(self._series) is None:  # no patch placed yet: nothing to seed from
            return
        due = [r for r in self._pending if final or r.due <= self._frames]
        if not due:
            return
        self._pending = [r for r in self._pending if r not in due]
        for r in due:
            # this stage runs ahead of the one that places patches: at the end of a short series the mosaic
            # may not exist yet, and the refiner looks it up again (_mosaic_of)
            r.stitcher = self.stitcher_of(r.series_id)
            with self._cond:
                self._busy_series[r.series_id] = self._busy_series.get(r.series_id, 0) + 1
            self._jobs.put((r, self._near(r)))

    def _near(self, reg: Region) -> tuple[np.ndarray, np.ndarray] | None:
        """Copies of the kept frames (and positions) whose probe footprint reaches the region's box."""
        if self._store is None:
            return None
        f, p = self._store
        reach = self.m / 2 + footprint_radius_px(self.probe)
        with np.errstate(invalid="ignore"):
            near = np.flatnonzero((np.abs(p - np.asarray(reg.centre)) <= reach).all(axis=1))
        return f[near], p[near]

    def _end_series(self, wait_placed: bool = False, timeout: float = 2.0) -> None:
        if self.scorer is not None and self._series is not None:
            if wait_placed:  # the post stage is a batch or two behind: score against the whole mosaic
                deadline = time.monotonic() + timeout
                while not self.stop.is_set() and time.monotonic() < deadline:
                    st = self.stitcher_of(self._series)
                    if (st.n_added if st is not None else 0) >= self._placeable:
                        break
                    time.sleep(0.001)
            self._score(final=True)
        if self._refiner is not None and self._pending:
            self._release(final=True)
        self._series, self._stored, self._frames, self._placeable = None, 0, 0, 0

    # --- refinement (background thread; the solve itself optionally on Dask) --------------------------
    def _refine_loop(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                break
            reg, store = item
            try:
                self._refine(reg, store)
            except Exception as exc:
                log.warning("refining region at %s failed: %s", reg.centre, exc)
                self.counters["regions_failed"] += 1
            finally:
                with self._cond:
                    self._busy_series[reg.series_id] -= 1
                    self._cond.notify_all()
        if self._client is not None:
            cluster = getattr(self._client, "cluster", None)
            self._client.close()
            if cluster is not None:
                cluster.close()

    def _solve(self, job: Any, n_iters: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.cfg.dask:
            return solve_sub(job, n_iters, EpieOptions())
        if self._client is None:
            from .refine import dask_client

            self._client = dask_client(None if self.cfg.dask == "local" else self.cfg.dask)
        return self._client.submit(solve_sub, job, n_iters, EpieOptions(), pure=False).result()

    def _mosaic_of(self, reg: Region, timeout: float = 30.0) -> Any:
        """The region's live mosaic, waiting (refiner thread only) until its first patch has been placed."""
        deadline = time.monotonic() + timeout
        while reg.stitcher is None and time.monotonic() < deadline and not self.stop.is_set():
            time.sleep(0.01)
            reg.stitcher = self.stitcher_of(reg.series_id)
        return reg.stitcher

    def _refine(self, reg: Region, store: tuple[np.ndarray, np.ndarray] | None) -> None:
        if self._mosaic_of(reg) is None or store is None:
            raise ValueError("no live mosaic or no kept frames for this series")
        frames, pos = store
        pos = pos - np.asarray(reg.stitcher.origin_px)  # canvas pixels
        seed = reg.stitcher.snapshot()
        pad = self.e // 2 + 2  # every window round a canvas position lies inside the padded seed
        obj = np.pad(seed, pad, constant_values=1)
        obj[np.abs(obj) == 0] = 1  # unvisited canvas pixels: a flat start
        h = self.m // 2
        cr = int(round(reg.centre[0])) - reg.stitcher.origin_px[0] + pad
        cc = int(round(reg.centre[1])) - reg.stitcher.origin_px[1] + pad
        box = (max(cr - h, pad), min(cr + h, pad + seed.shape[0]), max(cc - h, pad), min(cc + h, pad + seed.shape[1]))
        job = sub_problem(frames, pos + pad, self.solve_probe, obj, box, self.mask)
        n_iters = self.cfg.reference_iters if reg.kind == "reference" else self.cfg.refine_iters
        out, _, _ = self._solve(job, n_iters)
        before = self._region_residual(job, job.obj)
        r0, r1, c0, c1 = job.paste
        after_obj = job.obj.copy()
        after_obj[r0 - job.corner[0]:r1 - job.corner[0], c0 - job.corner[1]:c1 - job.corner[1]] = out
        after = self._region_residual(job, after_obj)
        cbox = (r0 - pad, r1 - pad, c0 - pad, c1 - pad)
        reg.stitcher.paste(cbox, out)
        with self._cond:
            self.refined.setdefault(reg.series_id, []).append((cbox, out))
        self.counters["regions_done"] += 1
        self.last_refine = {"kind": reg.kind, "frames": len(job.frames), "iterations": n_iters,
                            "residual_before": before, "residual_after": after}
        if reg.kind == "reference":
            cnn = seed[cbox[0]:cbox[1], cbox[2]:cbox[3]]
            self.monitor.add_reference(cnn, out, residuals=np.asarray([before]))
            self.counters["references_done"] += 1

    def _region_residual(self, job: Any, obj: np.ndarray) -> float:
        """Median residual of the region's frames against patches cut from `obj` (the seed or the refined)."""
        patches = extract_patches(obj, job.positions_px, self.m)
        return float(np.median(self.monitor.residual(job.frames, np.abs(patches), np.angle(patches))))

    # --- results -------------------------------------------------------------------------------------
    def wait_series(self, series_id: int, timeout: float = 60.0) -> bool:
        """Block until every refinement queued for the series is done (True) or `timeout` s passed."""
        with self._cond:
            return self._cond.wait_for(lambda: self._busy_series.get(series_id, 0) <= 0, timeout)

    def apply_refined(self, series_id: int, obj: np.ndarray) -> int:
        """Paste the series' refined regions into a final stitch on the live canvas (global phase matched)."""
        if not self.wait_series(series_id):
            log.warning("series %d: refinements still running; the final CXI goes without them", series_id)
        with self._cond:
            done = self.refined.pop(series_id, [])
        for (r0, r1, c0, c1), out in done:
            dot = np.vdot(out, obj[r0:r1, c0:c1])  # the final stitch has its own phase gauge and ramp
            obj[r0:r1, c0:c1] = out * np.complex64(dot / abs(dot)) if abs(dot) > 0 else out
        return len(done)

    def status(self) -> dict[str, Any]:
        s, sc = self.monitor.status(), self.scores.status()
        return {**self.counters, "residual_p50": s["residual_median"], "residual_p95": s["residual_p95"],
                "score_p50": sc["residual_median"], "score_p95": sc["residual_p95"],
                "score_alpha": self.cfg.score_alpha, "threshold": self.cfg.threshold, "every": self.cfg.every,
                "last_refine": self.last_refine, "reference_phase_nrmse": s["reference_phase_nrmse"]}
