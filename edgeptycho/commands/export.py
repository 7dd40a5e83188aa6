"""`edgeptycho export`: a training checkpoint → ONNX (dynamic batch) + metadata sidecar, checked against PyTorch."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="best.pt (or last.pt) from edgeptycho train/finetune")
    parser.add_argument("--out", type=Path, required=True, help="model.onnx (the .json sidecar goes beside it)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default: %(default)s)")
    parser.add_argument("--name", help="model name in the metadata (default: the file stem)")
    parser.add_argument("--version", help="model version (default: package version + date)")
    parser.add_argument("--reproduce", action="append", default=None, metavar="CMD",
                        help="a command that regenerates this model (repeat; default: the checkpoint's own)")
    parser.add_argument("--metrics", type=Path, help="JSON file of extra metrics to record (e.g. stitched NRMSE)")


def run(args: argparse.Namespace) -> int:
    from ..model.export import export_checkpoint

    extra = json.loads(args.metrics.read_text()) if args.metrics else None
    art, diff = export_checkpoint(args.checkpoint, args.out, args.opset, args.name, args.version,
                                  args.reproduce, extra)
    print(f"exported {art.name} → {art.path} (opset {args.opset}, {art.metadata['parameters']:,} parameters, "
          f"{art.metadata['flops'] / 1e9:.3f} GFLOP/pattern); ONNX Runtime vs PyTorch max |diff| {diff:.2e}; "
          f"sha256 {art.sha256[:16]}…")
    return 0
