"""`edgeptycho serve --config serve.yaml`: run the streaming service until stopped or the source ends."""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from edgeptycho.config import ConfigError
from edgeptycho.pipeline.runner import Pipeline, ScanInfo, ServeConfig, SourceConfig
from edgeptycho.stream.sources.base import Source

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML settings (see configs/serve.yaml)")
    parser.add_argument("--model", help="override model: zoo name or .onnx path")
    parser.add_argument("--backend", help="override backend.name (cpu, jetson, alveo, cuda, *-emu)")
    parser.add_argument("--batch", type=int, help="override backend.batch")
    parser.add_argument("--publish", help="override publish.endpoint, e.g. tcp://127.0.0.1:5560")
    parser.add_argument("--cxi", help="override output.cxi (final reconstruction per scan)")
    parser.add_argument("--duration", type=float, help="stop after this many seconds (default: run until stopped)")
    parser.add_argument("--json", action="store_true", help="print the final report as JSON")


def run(args: argparse.Namespace) -> int:
    cfg = ServeConfig.load(args.config)
    if args.model:
        cfg.model = args.model
    if args.backend:
        cfg.backend.name = args.backend
    if args.batch:
        cfg.backend.batch = args.batch
    if args.publish:
        cfg.publish.endpoint = args.publish
    if args.cxi:
        cfg.output.cxi = args.cxi
    pipe = build_pipeline(cfg)
    signals = {"n": 0}

    def on_signal(signum: int, _frame: Any) -> None:
        signals["n"] += 1
        hard = signals["n"] > 1
        log.warning("%s: %s", signal.Signals(signum).name,
                    "stopping now, dropping frames in flight" if hard else "draining frames in flight, then stopping")
        pipe.stop(hard=hard)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        pipe.start()
        endpoint = pipe.publisher.endpoint if pipe.publisher is not None else "disabled"
        print(f"edgeptycho serve: {cfg.source.kind} source → {cfg.backend.name} ({cfg.backend.precision}, batch "
              f"{cfg.backend.batch}) → results on {endpoint}", file=sys.stderr)
        address = getattr(pipe.source, "address", None)
        if isinstance(address, tuple):  # tcp: the bound port (endpoint port 0 picks a free one)
            print(f"edgeptycho serve: frames listening on tcp://{address[0]}:{address[1]}", file=sys.stderr,
                  flush=True)
        elif address:
            print(f"edgeptycho serve: frames listening on {address}", file=sys.stderr, flush=True)
        timer = threading.Timer(args.duration, pipe.stop) if args.duration else None
        if timer is not None:
            timer.daemon = True
            timer.start()
        pipe.wait()
        if timer is not None:
            timer.cancel()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        pipe.backend.close()
        close = getattr(pipe.source, "close", None)
        if close is not None:  # listening sockets
            close()
        pipe.ring.allocator.close()  # shared-memory segments are unlinked here
        if pipe.publisher is not None:
            pipe.publisher.close()
    report = pipe.report()
    if args.json:
        print(json.dumps(report, indent=2, default=_json_default))
    else:
        print(summary(report))
    return 1 if report["errors"] else 0


def summary(report: dict[str, Any]) -> str:
    """A few human lines from a final report."""
    lat = report["latency_ms"]["receive_to_published"]
    lines = [
        f"frames: {report['frames_received']} received, {report['frames_published']} published, "
        f"{report['dropped']} dropped",
        f"throughput: {report['throughput_hz']:.1f} patterns/s; latency receive→publish p50 {lat['p50']} ms, "
        f"p99 {lat['p99']} ms",
        f"copies per frame between ring slot and backend input: {report['copies_per_frame']['slot_to_input']:.2f}",
    ]
    lines += [f"wrote {p}" for p in report["written"]]
    lines += [f"error: {e}" for e in report["errors"]]
    return "\n".join(lines)


def _json_default(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


# --- building a pipeline from settings -------------------------------------------------------------------
def _host_port(endpoint: str | None, default_port: int = 5555) -> tuple[str, int]:
    ep = endpoint or f"tcp://127.0.0.1:{default_port}"
    if not ep.startswith("tcp://") or ":" not in ep[6:]:
        raise ConfigError(f"'source.endpoint': expected tcp://HOST:PORT, got {ep!r}")
    host, port = ep[6:].rsplit(":", 1)
    try:
        return host, int(port)
    except ValueError:
        raise ConfigError(f"'source.endpoint': port must be a number, got {port!r}") from None


def _array_source(cfg: SourceConfig) -> tuple[Source, ScanInfo]:
    from edgeptycho.stream.sources.replay import ArraySource

    path = Path(cfg.path or "")
    if not path.is_file():
        raise FileNotFoundError(f"source.path: no such file {path}")
    data = np.load(path, allow_pickle=False)  # never unpickle
    if isinstance(data, np.ndarray):
        frames, pos_px, pos_m, pixel, probe = data, None, None, cfg.pixel_m or math.nan, None
    else:
        with data:
            if "frames" not in data:
                raise ConfigError(f"'source.path': {path} has no 'frames' array (has {list(data.keys())})")
            frames = data["frames"]
            pos_px = data["positions_px"] if "positions_px" in data else None
            pos_m = data["positions_m"] if "positions_m" in data else None
            pixel = float(data["pixel_m"]) if "pixel_m" in data else (cfg.pixel_m or math.nan)
            probe = data["probe"] if "probe" in data else None
    if pos_px is None and pos_m is not None and math.isfinite(pixel):
        pos_px = pos_m / pixel
    src = ArraySource(frames, positions_px=pos_px, positions_m=pos_m, rate_hz=cfg.rate_hz)
    return src, ScanInfo(pos_px, pixel, probe)


def build_source(cfg: SourceConfig, frame_size: int) -> tuple[Source, ScanInfo, tuple[tuple[int, int], Any], Any]:
    """(source, what is known of the scan, (frame shape, dtype), ring allocator or None) from settings."""
    info = ScanInfo(pixel_m=cfg.pixel_m or math.nan)
    allocator = None
    if cfg.kind == "array":
        src, info = _array_source(cfg)
    elif cfg.kind == "replay" or (cfg.kind == "shm" and cfg.path):
        from edgeptycho.io.cxi import open_scan
        from edgeptycho.stream.sources.replay import ReplaySource

        try:
            with open_scan(cfg.path) as scan:  # type: ignore[arg-type]
                info = ScanInfo.from_scan(scan)
        except ValueError as exc:  # plain HDF5 frames: replayed without geometry
            log.warning("%s", exc)
        src = ReplaySource(cfg.path, rate_hz=cfg.rate_hz)  # type: ignore[arg-type]
    elif cfg.kind == "tcp":
        from edgeptycho.stream.sources.tcp import TcpSource

        host, port = _host_port(cfg.endpoint)
        src = TcpSource(host, port)
    elif cfg.kind in ("dectris-v1", "dectris-v2"):
        from edgeptycho.stream.positions import PositionTable
        from edgeptycho.stream.sources import make_source

        table = PositionTable.from_file(cfg.positions, pixel_m=cfg.pixel_m) if cfg.positions else None
        if table is not None and table.pixel_m:
            info = ScanInfo(pixel_m=table.pixel_m)
        shape = tuple(cfg.frame_shape) if cfg.frame_shape else (frame_size, frame_size)
        src = make_source(cfg.kind, endpoint=cfg.endpoint, frame_shape=shape, dtype=cfg.dtype, positions=table)
    else:
        src = None
    if cfg.kind == "shm":
        from edgeptycho.hw.memory import SharedMemoryAllocator
        from edgeptycho.stream.sources.shm import ShmSource

        src = ShmSource(producer=src, address=cfg.endpoint)
        allocator = SharedMemoryAllocator()
    spec = src.frame_spec()
    if spec is None:
        shape = tuple(cfg.frame_shape) if cfg.frame_shape else (frame_size, frame_size)
        spec = ((int(shape[0]), int(shape[1])), np.dtype(cfg.dtype))
    return src, info, spec, allocator


def build_pipeline(cfg: ServeConfig, publisher: Any = None) -> Pipeline:
    """Open the model, backend, source and (unless given or disabled) the publisher named by `cfg`."""
    from edgeptycho.hw.registry import open_backend
    from edgeptycho.model.artifact import ModelArtifact
    from edgeptycho.stream.publish import Publisher

    art = ModelArtifact.load(cfg.model)
    frame_size = int(art.metadata.get("frame_size") or art.input_size * art.preprocess.bin)
    source, info, frame, allocator = build_source(cfg.source, frame_size)
    if cfg.stitch.probe:
        from edgeptycho.physics.probes import load_probe

        info.probe = load_probe(cfg.stitch.probe)
    opts = {k: v for k, v in (("threads", cfg.backend.threads), ("workers", cfg.backend.workers)) if v}
    backend = open_backend(cfg.backend.name, art.path, cfg.backend.batch, cfg.backend.precision, **opts)
    try:
        if publisher is None and cfg.publish.enabled:
            publisher = Publisher(cfg.publish.endpoint, cfg.publish.sndhwm, cfg.publish.count_drops)
        pipe = Pipeline(source, backend, art.preprocess, art.output_size, cfg.ring, frame, info, publisher,
                        cfg.batcher, cfg.backend.inflight, cfg.stitch, cfg.output, art.metadata, allocator,
                        cfg.publish.status_hz, cfg.scan_id, cfg.nice, quality=cfg.quality,
                        switch_interval_ms=cfg.switch_interval_ms, roi_center=cfg.source.roi_center)
    except BaseException:
        backend.close()
        raise
    return pipe
