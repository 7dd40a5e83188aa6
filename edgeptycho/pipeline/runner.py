"""The serve loop: assembling source → ring → batcher → backend → sinks, running and stopping it."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeptycho.hw.base import Backend
from edgeptycho.stream.ring import FrameRing, RingConfig
from edgeptycho.stream.sources.base import Source

from .batcher import Batcher, BatchPool, detector_roi
from .infer import InferStage
from .settings import (  # noqa: F401  (re-exported: the settings were defined here before)
    DEFAULT_SWITCH_MS,
    BackendConfig,
    BatcherConfig,
    OutputConfig,
    PublishConfig,
    ServeConfig,
    SourceConfig,
    StitchConfig,
    _check_switch,
    _SwitchInterval,
)
from .stages import (
    Geometry,
    MonitorStage,
    Port,
    PostStage,
    SeriesRecord,
    SeriesWriter,
    publish_mosaic,
)
from .stitcher import StitchResult, canvas_for, probe_weight, ramp_removal
from .telemetry import Telemetry
from .trust import QualityConfig, QualityStage, QualityTap

log = logging.getLogger(__name__)

@dataclass
class ScanInfo:
    """What the pipeline knows about the scan ahead of time (array and replay sources)."""

    positions_px: np.ndarray | None = None  # full-frame object pixels
    pixel_m: float = math.nan  # full-frame object pixel
    probe: np.ndarray | None = None  # (K, n, n) for the blending weight
    mask: np.ndarray | None = None  # (H, W) detector bad pixels, zeroed before preprocessing

    @classmethod
    def from_scan(cls, scan: Any) -> ScanInfo:
        """From a physics.types.ScanData (or a lazily opened CXIScan)."""
        return cls(scan.positions_px(), scan.object_pixel_m, scan.probe, scan.mask)


class Pipeline:
    """One running service: source → FrameRing → Batcher → InferStage → PostStage (+ writer, monitor).

    Build with objects (tests, demo, bench) or from a ServeConfig (build_pipeline). run() blocks until the
    source ends (every frame flushed, published, stitched and written) or stop() drains it early.
    """

    def __init__(self, source: Source, backend: Backend, preprocess: Any, output_size: int,
                 ring_cfg: RingConfig | None = None, frame: tuple[tuple[int, int], Any] | None = None,
                 scan: ScanInfo | None = None, publisher: Any = None, batcher: BatcherConfig | None = None,
                 inflight: int = 2, stitch: StitchConfig | None = None, output: OutputConfig | None = None,
                 model_info: dict[str, Any] | None = None, ring_allocator: Any = None, status_hz: float = 1.0,
                 scan_id: str = "", nice: int = 0, quality: QualityConfig | None = None,
                 switch_interval_ms: float | None = DEFAULT_SWITCH_MS, roi_center: Any = None):
        self.source, self.backend, self.spec = source, backend, preprocess
        self.publisher, self.model_info = publisher, model_info or {}
        bcfg, self.stitch_cfg, self.output = batcher or BatcherConfig(), stitch or StitchConfig(), output or OutputConfig()
        frame = frame or source.frame_spec()
        if frame is None:
            raise ValueError("the source does not know its frame shape: give source.frame_shape and source.dtype")
        (h, w), dtype = frame
        n_in = backend.input_spec.shape[-1]
        # a detector larger than the model's frames: the model reads a model-sized square of each frame
        size = int(self.model_info.get("frame_size") or (0 if preprocess.crop else n_in * preprocess.bin))
        roi = None
        if roi_center is not None or (size and (h, w) != (size, size) and
                                      (h != w or preprocess.input_size(w) != n_in)):
            if not size:
                raise ValueError("source.roi_center: the model's metadata does not give its detector frame size")
            roi = detector_roi((h, w), size, roi_center)
        if roi is not None:
            log.info("detector %dx%d: the model reads rows %d..%d, cols %d..%d", h, w, roi[0], roi[0] + size,
                     roi[1], roi[1] + size)
        fw = size if roi is not None else w  # the side of the frames the model sees
        if preprocess.input_size(fw) != n_in:
            raise ValueError(f"frames {h}x{fw} preprocess ({preprocess}) to {preprocess.input_size(fw)} px, "
                             f"but the model takes {n_in}")
        ring_cfg = ring_cfg or RingConfig()
        self.ring = FrameRing.from_config(ring_cfg, (h, w), dtype, ring_allocator)
        # a backend running several batches at once (cpu workers) gets them all in flight, and a pool with a
        # slot to fill and one in postprocessing besides
        inflight = max(inflight, int(getattr(backend, "workers", 1)))
        self.pool_size = max(bcfg.pool, inflight + 2)
        self.pool = BatchPool(backend, self.pool_size)
        B = self.pool.batch_size
        self.telemetry = Telemetry(max(1 << 16, 4 * (ring_cfg.slots + self.pool_size * B)))
        self.halt = threading.Event()  # hard stop: quit without draining
        self.source_stop = threading.Event()
        scan = scan or ScanInfo()
        m = int(output_size)
        factor = preprocess.pixel_size_factor(fw)
        self.probe = scan.probe
        self.weight = (probe_weight(scan.probe, m) if scan.probe is not None
                       else probe_weight(_gaussian(max(m, 2), m / 2.0), m))
        canvas, origin = None, (0, 0)
        if self.stitch_cfg.canvas_px:
            canvas = tuple(self.stitch_cfg.canvas_px)
        elif scan.positions_px is not None and np.isfinite(scan.positions_px).all():
            canvas, origin = canvas_for(scan.positions_px / factor, m)
        self.geometry = Geometry(canvas, origin, scan.pixel_m * factor, factor,
                                 remove_ramp=ramp_removal(self.stitch_cfg.remove_ramp, self.model_info))
        self.p_batch, self.p_post, self.p_write = (Port("batched", self.pool_size), Port("inferred", self.pool_size),
                                                   Port("writer"))
        scale = backend.input_spec.scale
        self.infer = InferStage(backend, self.p_batch, self.p_post, self.telemetry, inflight, self.halt)
        self.batcher = Batcher(self.ring, self.pool, self.p_batch, preprocess, self.telemetry,
                               bcfg.max_wait_ms / 1e3, mask=scan.mask, scale=scale, stop=self.halt,
                               gate=self.infer, roi=roi)
        if scan.mask is None:  # detector sources learn the mask per series, from its header
            self.batcher.mask_provider = getattr(source, "mask_for", None)
        self.pub_lock = threading.Lock()
        self.quality = self._quality_stage(quality, scan, m, fw, factor, dtype)
        self.post = PostStage(self.p_check if self.quality else self.p_post, self.pool, self.telemetry, self.weight, self.geometry, publisher,
                              self.pub_lock, self.p_write, self.output.keep_max, self.halt)
        self.writer = SeriesWriter(self.p_write, self.weight, self.geometry, self._on_series, self.halt)
        self.monitor_done = threading.Event()
        self.monitor = (MonitorStage(self.post, self.status, publisher, self.pub_lock, self.stitch_cfg.mosaic_hz,
                                     status_hz, self.stitch_cfg.mosaic_max_px, self.monitor_done)
                        if publisher is not None else None)
        if publisher is not None:
            from edgeptycho.stream.publish import StreamContext

            mi = self.model_info
            publisher.set_context(StreamContext(
                scan_id=scan_id, pixel_size_m=self.geometry.pixel_m,
                model={"name": str(mi.get("name", "")), "version": str(mi.get("version", "")),
                       "sha256": str(mi.get("sha256", ""))},
                backend=backend.name, precision=backend.precision, extra={"patch_origin": "centre"}))
        self.results: dict[int, StitchResult] = {}
        self.written: list[str] = []
        self.t_start = self.t_end = 0.0
        self._threads: list[threading.Thread] = []
        self._source_thread: threading.Thread | None = None
        self.cpu_s: dict[str, float] = {}  # thread CPU seconds per stage, filled as each stage ends
        self.errors: list[str] = []
        if not 0 <= nice <= 19:
            raise ValueError(f"nice must be in 0..19, got {nice}")
        self.nice = int(nice)
        _check_switch(switch_interval_ms)
        self.switch_interval_ms = switch_interval_ms
        self._switch_held = False
        self.process_cpu_at_end: dict[str, float] = {}  # process CPU clock when each stage ended

    def _quality_stage(self, cfg: QualityConfig | None, scan: ScanInfo, m: int, frame: int, factor: float,
                       dtype: Any) -> QualityStage | None:
        """The residual / fallback stage between inference and postprocessing (pipeline.trust), if it can run."""
        if cfg is None or not cfg.enabled:
            return None
        if scan.probe is None or factor != 1.0:
            log.warning("quality monitor off: it needs the probe%s", "" if scan.probe is None else
                        " and a model whose patch pixel is the frame's object pixel (crop 0)")
            return None
        self.p_check = Port("checked", self.pool_size)
        stage = QualityStage(self.p_post, self.p_check, cfg, scan.probe, m, frame, self.geometry,
                             lambda sid: self.post.stitcher_for(sid), self.batcher.cut_mask(scan.mask),
                             self.halt)
        self.batcher.tap = QualityTap(cfg.every, self.pool.batch_size, (frame, frame), dtype, stage.backlogged)
        return stage

    # --- sinks at the end of a series ---------------------------------------------------------------
    def cxi_path(self, series_id: int) -> Path | None:
        tpl = self.output.cxi
        if not tpl:
            return None
        if "{series}" in tpl:
            return Path(tpl.format(series=series_id))
        p = Path(tpl)
        return p if not self.written else p.with_name(f"{p.stem}-s{series_id}{p.suffix}")

    def _on_series(self, rec: SeriesRecord, result: StitchResult) -> None:
        if self.quality is not None:  # refined regions go into the final image too
            self.quality.apply_refined(rec.series_id, result.object)
        self.results[rec.series_id] = result
        if self.publisher is not None:  # the final (offline-reconciled) image replaces the live one
            publish_mosaic(self.publisher, self.pub_lock, np.abs(result.object), np.angle(result.object),
                           result.origin_px, self.geometry, rec.n, max(result.object.shape),
                           {"final": True, "series_id": rec.series_id}, result.uncertainty)
        path = self.cxi_path(rec.series_id)
        if path is not None:
            from edgeptycho.io.cxi import write_reconstruction

            recon = self.reconstruction(rec, result)
            write_reconstruction(path, recon, command="edgeptycho serve")
            self.written.append(str(path))
            log.info("series %d: wrote %s", rec.series_id, path)

    def reconstruction(self, rec: SeriesRecord | None, result: StitchResult) -> Any:
        """The stitched result as a physics.types.Reconstruction (SI units, positions of the kept frames)."""
        from edgeptycho.physics.types import Reconstruction

        pixel = self.geometry.pixel_m
        pos_m = (np.concatenate(rec.meta)["position_m"] if rec is not None and rec.meta else np.zeros((0, 2)))
        return Reconstruction(
            object=result.object, pixel_m=pixel if math.isfinite(pixel) else 0.0, positions_m=pos_m,
            probe=self.probe, uncertainty=result.uncertainty, origin_m=(result.origin_px[0] * pixel, result.origin_px[1] * pixel)
            if math.isfinite(pixel) else (0.0, 0.0),
            program={"stage": "cnn stream + stitch", "model": str(self.model_info.get("name", "")),
                     "model_sha256": str(self.model_info.get("sha256", "")), "backend": self.backend.name,
                     "phase_ramp_removed_rad_per_px": [float(v) for v in result.ramp]})

    # --- running -------------------------------------------------------------------------------------
    def _timed(self, name: str, target: Any) -> Any:
        def run() -> None:
            if self.nice and name != "infer":
                # Helper threads yield the CPU to the inference thread on a saturated host (Linux: per thread).
                try:
                    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
                except (AttributeError, OSError) as exc:
                    log.warning("could not renice thread %s: %s", name, exc)
            t0 = time.thread_time()
            try:
                target()
            except Exception as exc:  # a dead stage would leave the others waiting: stop everything
                log.exception("pipeline stage '%s' failed; stopping", name)
                self.errors.append(f"{name}: {type(exc).__name__}: {exc}")
                self.stop(hard=True)
            finally:  # CPU seconds of this thread: robust against other load, unlike wall time
                self.cpu_s[name] = time.thread_time() - t0
                self.process_cpu_at_end[name] = time.process_time()
        return run

    def start(self, warmup: bool = True) -> None:
        """Start every stage, then the source. `warmup` first runs one full zero batch, so the first frames
        do not pay the backend's one-time costs (memory arenas, kernel selection, engine load)."""
        if warmup:  # one batch per slot in flight, so that every session of a parallel backend is warm
            tickets = []
            for slot in self.pool.slots[:self.infer.inflight]:
                slot.inputs[...] = 0
                tickets.append(self.backend.submit(slot.inputs, slot.outputs, n=len(slot.inputs)))
            for ticket in tickets:
                self.backend.wait(ticket)
        if self.switch_interval_ms is not None and not self._switch_held:
            _SwitchInterval.acquire(self.switch_interval_ms / 1e3)
            self._switch_held = True
        self.t_start = time.perf_counter()
        stages = ([("batcher", self.batcher.run), ("infer", self.infer.run)]
                  + ([("quality", self.quality.run)] if self.quality else [])
                  + [("post", self.post.run), ("writer", self.writer.run)]
                  + ([("monitor", self.monitor.run)] if self.monitor else []))
        for name, target in stages:
            t = threading.Thread(target=self._timed(name, target), name=f"pipeline-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        self._source_thread = threading.Thread(
            target=self._timed("source", lambda: self.source.run(self.ring, self.source_stop)),
            name=f"source-{self.source.name}", daemon=True)
        self._source_thread.start()

    def stop(self, hard: bool = False) -> None:
        """Stop taking frames; everything already received is still inferred and published (hard: drop it)."""
        self.source_stop.set()
        self.ring.close_input()
        if hard:
            self.halt.set()
            self._release_switch()

    def _release_switch(self) -> None:
        if self._switch_held:
            self._switch_held = False
            _SwitchInterval.release()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the stream is over and every stage has drained; True when done."""
        deadline = None if timeout is None else time.monotonic() + timeout
        n_flow = 5 if self.quality else 4
        for t in self._threads[:n_flow]:  # batcher, infer, (quality,) post, writer: in flow order
            while t.is_alive():
                t.join(0.1 if deadline is None else max(min(0.1, deadline - time.monotonic()), 0))
                if deadline is not None and time.monotonic() >= deadline:
                    return False
        self.t_end = time.perf_counter()
        self.monitor_done.set()
        for t in self._threads[n_flow:]:
            t.join()
        if self._source_thread is not None:
            self._source_thread.join(1.0)
        self._release_switch()
        if self.publisher is not None:
            with self.pub_lock:
                self.publisher.publish_status({**self.status(), "final": True})
        return True

    def run(self, timeout: float | None = None) -> dict[str, Any]:
        """start() + wait(); returns the final report."""
        self.start()
        if not self.wait(timeout):
            self.stop(hard=True)
            self.wait(5.0)
            raise TimeoutError(f"pipeline did not finish within {timeout} s")
        return self.report()

    # --- telemetry -----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The `status` message: rates, latency percentiles, drops, queue depths, counters."""
        ring = self.ring.stats()
        out = self.telemetry.status(
            drops={"ring_dropped": ring["dropped"], "ring_overwritten": ring["overwritten"],
                   "publish_dropped": self.post.counters["publish_dropped"]},
            queues={"ring_queued": ring["queued"], "ring_in_flight": ring["in_flight"],
                    "ring_high_water": ring["high_water"], "batched": self.p_batch.depth(),
                    "inferred": self.p_post.depth(), "writer": self.p_write.depth(), "pool_free": self.pool.free},
            batcher=dict(self.batcher.counters), post=dict(self.post.counters),
            source=self.source.counters(), backend=self.backend.name, precision=self.backend.precision)
        if self.quality is not None:
            out["quality"] = self.quality.status()
        return out

    def report(self) -> dict[str, Any]:
        """Final accounting and timings of a finished run."""
        ring, tel = self.ring.stats(), self.telemetry
        frames = self.batcher.counters["frames"]
        wall = max(self.t_end - self.t_start, 1e-9)
        return {
            "frames_received": ring["received"], "frames_inferred": frames,
            "frames_published": tel.rates["published"].count,
            "dropped": ring["dropped"] + ring["overwritten"], "lost_ids": self.ring.lost_ids().tolist()[:100],
            "throughput_hz": tel.throughput(), "wall_s": wall,
            "backend_busy_fraction": self.infer.busy_s / wall,
            "latency_ms": {k: h.summary() for k, h in tel.hist.items()},
            "batches": {k: self.batcher.counters[k] for k in ("batches", "full", "deadline", "end", "close")},
            "copies_per_frame": self.copies_per_frame(),
            "publisher": self.publisher.stats() if self.publisher is not None else None,
            "mosaics": self.monitor.mosaics if self.monitor else 0, "written": list(self.written),
            "errors": self.errors + self.writer.errors + ([f"post: {self.post.counters['errors']} batch(es) failed, "
                                                            f"last {self.post.last_error}"]
                                                           if self.post.counters["errors"] else []),
            "source": self.source.counters(), "ring": ring,
            "cpu_us_per_frame": {k: round(1e6 * v / max(frames, 1), 1) for k, v in self.cpu_s.items()},
        }

    def copies_per_frame(self) -> dict[str, float]:
        """Payload copies per frame between the ring slot and the backend input (the preprocess write is one)."""
        n = max(self.batcher.counters["frames"], 1)
        tap = self.batcher.tap  # the quality monitor's copies of the frames it checks: not the payload path
        return {"slot_to_input": (self.batcher.counters["payload_writes"] + self.batcher.counters["gathers"]) / n,
                "gathers": self.batcher.counters["gathers"] / n,
                "quality_copies": (tap.copied / n) if tap is not None else 0.0}


def _gaussian(n: int, fwhm: float) -> np.ndarray:
    from edgeptycho.physics.probes import gaussian_probe

    return gaussian_probe(n, fwhm)
