"""The streaming pipeline: batcher, backend stage, sinks (PUB, live stitcher, CXI), telemetry, the serve loop."""

from .runner import Pipeline, ScanInfo, ServeConfig
from .stitcher import LiveStitcher, StitchResult, probe_weight, stitch

__all__ = ["LiveStitcher", "Pipeline", "ScanInfo", "ServeConfig", "StitchResult", "probe_weight", "stitch"]
