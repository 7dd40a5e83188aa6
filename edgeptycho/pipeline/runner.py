"""The serve loop: settings, assembling source → ring → batcher → backend → sinks, running and stopping it."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgeptycho.config import from_mapping, load_yaml
from edgeptycho.hw.base import Backend
from edgeptycho.stream.ring import FrameRing, RingConfig
from edgeptycho.stream.sources.base import Source

from .batcher import Batcher, BatchPool
from .stages import (
    Geometry,
    InferStage,
    MonitorStage,
    Port,
    PostStage,
    SeriesRecord,
    SeriesWriter,
    publish_mosaic,
)
from .stitcher import StitchResult, canvas_for, probe_weight
from .telemetry import Telemetry

log = logging.getLogger(__name__)


@dataclass
class SourceConfig:
    """Where frames come from. replay: a CXI/HDF5 `path`; array: an .npy/.npz `path` held in memory; tcp:
    listen on `endpoint` (tcp://127.0.0.1:PORT); shm: a ReplaySource on `path` in a child process, or an
    external producer connecting to the Unix socket `endpoint`; dectris-v1/-v2: a PULL client of the
    detector's stream at `endpoint`, with scan positions from the `positions` file."""

    kind: Literal["replay", "tcp", "shm", "array", "dectris-v1", "dectris-v2"] = "replay"
    path: str | None = None
    rate_hz: float | None = None  # replay/array pacing; null = as fast as the ring takes them
    endpoint: str | None = None
    frame_shape: list[int] | None = None  # tcp/shm without a file: detector (H, W); default: the model's
    dtype: str = "uint32"  # tcp/shm without a file: pixel dtype
    pixel_m: float | None = None  # object pixel size (m) when the source does not carry it
    positions: str | None = None  # dectris: scan positions by frame id (CXI, .npy or text; PositionTable)

    def __post_init__(self) -> None:
        if self.kind in ("replay", "array") and not self.path:
            raise ValueError(f"source.kind '{self.kind}' needs source.path")
        if self.rate_hz is not None and self.rate_hz <= 0:
            raise ValueError(f"source.rate_hz must be > 0 or null, got {self.rate_hz}")
        if self.frame_shape is not None and (len(self.frame_shape) != 2 or min(self.frame_shape) < 1):
            raise ValueError(f"source.frame_shape must be [H, W], got {self.frame_shape}")


@dataclass
class BackendConfig:
    name: str = "cpu"
    batch: int = 32
    precision: str = "fp32"
    inflight: int = 2  # batches submitted ahead where the backend is asynchronous
    threads: int | None = None  # cpu: intra-op threads (default: physical cores)

    def __post_init__(self) -> None:
        if self.batch < 1 or self.inflight < 1:
            raise ValueError("backend.batch and backend.inflight must be >= 1")


@dataclass
class BatcherConfig:
    max_wait_ms: float = 5.0  # flush a partial batch when its oldest frame has waited this long
    pool: int = 4  # preallocated input/output batches (>= 2: one fills while one infers)

    def __post_init__(self) -> None:
        if self.max_wait_ms < 0 or self.pool < 2:
            raise ValueError("batcher.max_wait_ms must be >= 0 and batcher.pool >= 2")


@dataclass
class PublishConfig:
    endpoint: str = "tcp://127.0.0.1:5560"
    sndhwm: int = 1000  # messages queued per subscriber before ZeroMQ drops for that subscriber
    enabled: bool = True
    count_drops: bool = False  # true: a full subscriber makes sends fail (counted) for everyone
    status_hz: float = 1.0


@dataclass
class StitchConfig:
    mosaic_hz: float = 10.0
    probe: str | None = None  # probe file for the blending weight (default: the scan file's, else Gaussian)
    canvas_px: list[int] | None = None  # live canvas (H, W); default: the scan's extent, else 1024² on the first patch
    # Live mosaics larger than this are decimated: a display at 10 Hz needs no more, and an 830-px float32
    # amplitude + phase pair costs ~1 ms of copying per message. The end-of-scan mosaic goes out whole.
    mosaic_max_px: int = 512

    def __post_init__(self) -> None:
        if not 0 <= self.mosaic_hz <= 100:
            raise ValueError(f"stitch.mosaic_hz must be in [0, 100], got {self.mosaic_hz}")


@dataclass
class OutputConfig:
    cxi: str | None = None  # final reconstruction per series; "{series}" in the name is the series id
    keep_max: int = 16384  # patches kept per series for the final offline stitch (else the live mosaic)


@dataclass
class ServeConfig:
    """`edgeptycho serve` settings (configs/serve.yaml documents every key)."""

    source: SourceConfig = field(default_factory=lambda: SourceConfig(kind="tcp"))
    ring: RingConfig = field(default_factory=RingConfig)
    model: str = "default"
    backend: BackendConfig = field(default_factory=BackendConfig)
    batcher: BatcherConfig = field(default_factory=BatcherConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    stitch: StitchConfig = field(default_factory=StitchConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    scan_id: str = ""
    # Niceness of the service's helper threads (source, batcher, sinks), not of the inference thread: > 0
    # lets the backend win a saturated CPU (docs/BENCHMARKS.md, "Streaming pipeline", measures the trade).
    nice: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.nice <= 19:
            raise ValueError(f"nice must be in 0..19, got {self.nice}")

    @classmethod
    def load(cls, path: str | Path) -> ServeConfig:
        """Read and validate a YAML file; ConfigError names the offending key."""
        return from_mapping(cls, load_yaml(path))


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
                 scan_id: str = "", nice: int = 0):
        self.source, self.backend, self.spec = source, backend, preprocess
        self.publisher, self.model_info = publisher, model_info or {}
        bcfg, self.stitch_cfg, self.output = batcher or BatcherConfig(), stitch or StitchConfig(), output or OutputConfig()
        frame = frame or source.frame_spec()
        if frame is None:
            raise ValueError("the source does not know its frame shape: give source.frame_shape and source.dtype")
        (h, w), dtype = frame
        n_in = backend.input_spec.shape[-1]
        if preprocess.input_size(w) != n_in:
            raise ValueError(f"frames {h}x{w} preprocess ({preprocess}) to {preprocess.input_size(w)} px, "
                             f"but the model takes {n_in}")
        ring_cfg = ring_cfg or RingConfig()
        self.ring = FrameRing.from_config(ring_cfg, (h, w), dtype, ring_allocator)
        self.pool = BatchPool(backend, bcfg.pool)
        B = self.pool.batch_size
        self.telemetry = Telemetry(max(1 << 16, 4 * (ring_cfg.slots + bcfg.pool * B)))
        self.halt = threading.Event()  # hard stop: quit without draining
        self.source_stop = threading.Event()
        scan = scan or ScanInfo()
        m = int(output_size)
        factor = preprocess.pixel_size_factor(w)
        self.probe = scan.probe
        self.weight = (probe_weight(scan.probe, m) if scan.probe is not None
                       else probe_weight(_gaussian(max(m, 2), m / 2.0), m))
        canvas, origin = None, (0, 0)
        if self.stitch_cfg.canvas_px:
            canvas = tuple(self.stitch_cfg.canvas_px)
        elif scan.positions_px is not None and np.isfinite(scan.positions_px).all():
            canvas, origin = canvas_for(scan.positions_px / factor, m)
        self.geometry = Geometry(canvas, origin, scan.pixel_m * factor, factor)
        self.p_batch, self.p_post, self.p_write = Port("batched", bcfg.pool), Port("inferred", bcfg.pool), Port("writer")
        scale = backend.input_spec.scale
        self.infer = InferStage(backend, self.p_batch, self.p_post, self.telemetry, inflight, self.halt)
        self.batcher = Batcher(self.ring, self.pool, self.p_batch, preprocess, self.telemetry,
                               bcfg.max_wait_ms / 1e3, mask=scan.mask, scale=scale, stop=self.halt,
                               gate=self.infer)
        if scan.mask is None and hasattr(source, "mask"):  # detector sources learn the mask per series
            self.batcher.mask_provider = lambda: getattr(source, "mask", None)
        self.pub_lock = threading.Lock()
        self.post = PostStage(self.p_post, self.pool, self.telemetry, self.weight, self.geometry, publisher,
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
        self.process_cpu_at_end: dict[str, float] = {}  # process CPU clock when each stage ended

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
        self.results[rec.series_id] = result
        if self.publisher is not None:  # the final (offline-reconciled) image replaces the live one
            publish_mosaic(self.publisher, self.pub_lock, np.abs(result.object), np.angle(result.object),
                           result.origin_px, self.geometry, rec.n, max(result.object.shape),
                           {"final": True, "series_id": rec.series_id})
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
            probe=self.probe, origin_m=(result.origin_px[0] * pixel, result.origin_px[1] * pixel)
            if math.isfinite(pixel) else (0.0, 0.0),
            program={"stage": "cnn stream + stitch", "model": str(self.model_info.get("name", "")),
                     "model_sha256": str(self.model_info.get("sha256", "")), "backend": self.backend.name})

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
        if warmup:
            slot = self.pool.slots[0]
            slot.inputs[...] = 0
            self.backend.wait(self.backend.submit(slot.inputs, slot.outputs, n=len(slot.inputs)))
        self.t_start = time.perf_counter()
        stages = [("batcher", self.batcher.run), ("infer", self.infer.run), ("post", self.post.run),
                  ("writer", self.writer.run)] + ([("monitor", self.monitor.run)] if self.monitor else [])
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

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the stream is over and every stage has drained; True when done."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads[:4]:  # batcher, infer, post, writer: in flow order
            while t.is_alive():
                t.join(0.1 if deadline is None else max(min(0.1, deadline - time.monotonic()), 0))
                if deadline is not None and time.monotonic() >= deadline:
                    return False
        self.t_end = time.perf_counter()
        self.monitor_done.set()
        for t in self._threads[4:]:
            t.join()
        if self._source_thread is not None:
            self._source_thread.join(1.0)
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
        return {"slot_to_input": (self.batcher.counters["payload_writes"] + self.batcher.counters["gathers"]) / n,
                "gathers": self.batcher.counters["gathers"] / n}


def _gaussian(n: int, fwhm: float) -> np.ndarray:
    from edgeptycho.physics.probes import gaussian_probe

    return gaussian_probe(n, fwhm)
