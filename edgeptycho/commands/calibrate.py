"""`edgeptycho calibrate`: quantize a model (dpu-pow2, trt-int8 or fp16) on calibration patterns into an artifact."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..quantization.observers import OBSERVERS
    from ..quantization.schemes import DEFAULT_OBSERVER, SCHEMES

    parser.add_argument("--model", required=True, help="zoo name or .onnx path (with its JSON sidecar)")
    parser.add_argument("--data", help="calibration scan: a CXI file (experimental or simulated) or "
                                       "sim:KIND[:SEED] to simulate one (KIND: siemens-star, ic, cells, texture)")
    parser.add_argument("--n", type=int, default=512, help="calibration patterns, spread over the scan "
                                                           "(default: %(default)s)")
    parser.add_argument("--scheme", required=True, choices=list(SCHEMES), help="deployment scheme")
    parser.add_argument("--observer", choices=OBSERVERS, default=DEFAULT_OBSERVER,
                        help="activation range observer (default: %(default)s)")
    parser.add_argument("--weights", choices=("mse", "minmax"), default="mse",
                        help="dpu-pow2 weight fix_point: min-MSE (the DPU quantizer's default) or non-overflow")
    parser.add_argument("--qat", type=Path, metavar="DATASET",
                        help="dpu-pow2 only: quantization-aware fine-tuning on this training set (edgeptycho "
                             "dataset output) when post-training quantization loses too much")
    parser.add_argument("--qat-steps", type=int, default=400, help="QAT optimiser steps (default: %(default)s)")
    parser.add_argument("--qat-lr", type=float, default=1e-4, help="QAT learning rate (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="QAT torch threads (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="output .onnx (sidecar .json beside it)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from ..quantization.qat import QatSettings
    from ..quantization.report import progress_bar
    from ..quantization.schemes import calibrate_artifact

    qat = QatSettings(steps=args.qat_steps, lr=args.qat_lr, threads=args.threads)
    art, result = calibrate_artifact(args.model, args.scheme, args.out, args.data, args.n, args.observer,
                                     args.weights, progress_bar(args.no_progress), args.qat, qat)
    q = art.metadata["quantization"]
    print(f"{args.scheme} model {art.path} (sidecar {art.path.with_suffix('.json').name}, sha256 "
          f"{art.sha256[:12]}…)")
    if q.get("calibration"):
        print(f"  calibrated on {q['calibration']['n']} patterns ({q['calibration']['source']}), "
              f"observer {args.observer}")
    if result.fix_points:
        acts = result.fix_points["activations"]
        print(f"  {len(acts)} activation fix_points in [{min(acts.values())}, {max(acts.values())}], "
              f"{len(result.adjustments)} moved by DPU constraints")
    print(f"  run it: edgeptycho reconstruct SCAN --model {art.path} --backend {q['backend']} "
          f"--precision {q['precision']}")
    return 0
