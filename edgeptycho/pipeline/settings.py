"""Serve-loop settings: the `edgeptycho serve` YAML sections as dataclasses, and the GIL switch-interval guard."""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from edgeptycho.config import from_mapping, load_yaml
from edgeptycho.stream.ring import RingConfig

from .score import SCORE_ALPHA
from .stitcher import RAMP_SETTINGS

# GIL switch interval while a pipeline runs (ServeConfig.switch_interval_ms); None keeps the interpreter's.
DEFAULT_SWITCH_MS: float | None = None


def _check_switch(ms: float | None) -> None:
    if ms is not None and not 0.01 <= ms <= 100:
        raise ValueError(f"switch_interval_ms must be in [0.01, 100] or null, got {ms}")


class _SwitchInterval:
    """sys.setswitchinterval for the lifetime of running pipelines: set by the first, restored by the last."""

    _lock = threading.Lock()
    _users = 0
    _saved = 0.005

    @classmethod
    def acquire(cls, seconds: float) -> None:
        with cls._lock:
            if cls._users == 0:
                cls._saved = sys.getswitchinterval()
            cls._users += 1
            sys.setswitchinterval(seconds)

    @classmethod
    def release(cls) -> None:
        with cls._lock:
            if cls._users == 0:
                return
            cls._users -= 1
            if cls._users == 0:
                sys.setswitchinterval(cls._saved)


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
    # detector frames larger than the model's: the model-sized region of interest is centred on this
    # detector pixel [row, col] (the direct beam); null = the frame's centre
    roi_center: list[float] | None = None

    def __post_init__(self) -> None:
        if self.roi_center is not None and len(self.roi_center) != 2:
            raise ValueError(f"source.roi_center must be [row, col] (detector pixels), got {self.roi_center}")
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
    threads: int | None = None  # cpu: cores the backend uses (default: physical cores)
    workers: int | None = None  # cpu: sessions running batches at once (default: 2 where threads >= 2)

    def __post_init__(self) -> None:
        if self.batch < 1 or self.inflight < 1:
            raise ValueError("backend.batch and backend.inflight must be >= 1")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"backend.workers must be >= 1, got {self.workers}")


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
    # Remove the mosaic's global phase ramp: true, false, or "auto" (only for an int8 model, which tilts its
    # patches). The measured slope holds the object's own mean phase gradient as well as the model's tilt,
    # and the FP32 model hardly tilts (docs/pipeline.md, "Phase ramp").
    remove_ramp: bool | str = "auto"

    def __post_init__(self) -> None:
        if not 0 <= self.mosaic_hz <= 100:
            raise ValueError(f"stitch.mosaic_hz must be in [0, 100], got {self.mosaic_hz}")
        if self.remove_ramp not in RAMP_SETTINGS:
            raise ValueError(f"stitch.remove_ramp must be true, false or auto, got {self.remove_ramp!r}")


@dataclass
class QualityConfig:
    """`quality:` block of serve.yaml (configs/serve.yaml documents every key)."""

    enabled: bool = True  # needs the probe (scan file or stitch.probe); off without one
    # residual of one frame in `every`: at every frame it measured 0.68× the inference thread's CPU (cpu-default,
    # 256-px frames, grid 128; 31 % of the pipeline's CPU), at 1 in 4 11.6 %. On a CPU backend that CPU comes
    # straight out of inference, so the default samples 1 in 16 (~3 %); set 1 where the host CPU is idle
    # (GPU, Jetson, Alveo backends)
    every: int = 16
    # score above which a frame's region is refined; null = no fallback. The score is residual ×
    # disagreement^score_alpha (pipeline.score.combined_score): the patch's Fourier misfit times its RMS phase
    # difference (rad) from its neighbours' patches, computed `score_delay` frames after the frame, once
    # the neighbours on both sides are in the mosaic. score_alpha 0: the residual alone, judged at once.
    threshold: float | None = None
    score_alpha: float = SCORE_ALPHA
    score_delay: int = 128
    refine_iters: int = 10
    refine_delay: int = 256  # frames after a flag before its region is refined (its neighbours have arrived)
    reference_every: int = 0  # frames between reference regions (0 = none)
    reference_iters: int = 50
    keep_frames: int = 2048  # checked frames kept per series for refinement (binned to the e×e window)
    dask: str | None = None  # null: a background thread; "local": a LocalCluster; or a scheduler address
    max_backlog: int = 1  # batches waiting for the stage beyond which it skips batches

    def __post_init__(self) -> None:
        if self.every < 1 or self.refine_iters < 0 or self.reference_iters < 0 or self.refine_delay < 0:
            raise ValueError("quality.every must be >= 1; refine_iters, reference_iters, refine_delay >= 0")
        if self.score_alpha < 0 or self.score_delay < 0:
            raise ValueError(f"quality.score_alpha ({self.score_alpha}) and quality.score_delay "
                             f"({self.score_delay}) must be >= 0")
        if self.reference_every < 0 or self.keep_frames < 1 or self.max_backlog < 0:
            raise ValueError("quality.reference_every >= 0, keep_frames >= 1 and max_backlog >= 0 required")
        if self.threshold is not None and not self.threshold > 0:
            raise ValueError(f"quality.threshold must be > 0 or null, got {self.threshold}")


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
    quality: QualityConfig = field(default_factory=QualityConfig)
    scan_id: str = ""
    # Niceness of the service's helper threads (source, batcher, sinks), not of the inference thread: > 0
    # lets the backend win a saturated CPU (docs/BENCHMARKS.md, "Streaming pipeline", measures the trade).
    nice: int = 0
    # Python's GIL switch interval while the service runs (process-wide; restored when it stops): the longest
    # a thread back from ONNX Runtime waits for a helper thread to give up the GIL. null (default) keeps
    # the interpreter's 5 ms: the backend's idle gaps measured so far did not depend on it (docs/pipeline.md).
    switch_interval_ms: float | None = DEFAULT_SWITCH_MS

    def __post_init__(self) -> None:
        if not 0 <= self.nice <= 19:
            raise ValueError(f"nice must be in 0..19, got {self.nice}")
        _check_switch(self.switch_interval_ms)

    @classmethod
    def load(cls, path: str | Path) -> ServeConfig:
        """Read and validate a YAML file; ConfigError names the offending key."""
        return from_mapping(cls, load_yaml(path))
