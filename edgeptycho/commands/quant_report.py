"""`edgeptycho quant-report`: each deployment scheme against FP32 on held-out scans, as Markdown + PNG plots."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..quantization.heldout import DEFAULT_SCHEMES
    from ..quantization.observers import OBSERVERS
    from ..quantization.schemes import DEFAULT_OBSERVER, SCHEMES

    parser.add_argument("--model", default="default", help="zoo name or .onnx path (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="report directory (report.md, PNGs, models/)")
    parser.add_argument("--scans", nargs="+", type=Path,
                        help="held-out simulated CXI scans with ground truth (default: a fresh simulation of "
                             "each object kind at the model's frame size)")
    parser.add_argument("--schemes", nargs="+", choices=list(SCHEMES), default=list(DEFAULT_SCHEMES))
    parser.add_argument("--observer", choices=OBSERVERS, default=DEFAULT_OBSERVER,
                        help="activation observer for the int8 schemes (default: %(default)s)")
    parser.add_argument("--calibration", help="calibration scan (CXI or sim:KIND[:SEED]); default: simulated "
                                              "scans of every object kind with seeds unlike the held-out ones")
    parser.add_argument("--n-cal", type=int, default=256, help="calibration patterns (default: %(default)s)")
    parser.add_argument("--positions", type=int, help="scan positions per simulated held-out scan")
    parser.add_argument("--layer-patterns", type=int, default=32,
                        help="held-out patterns for the per-layer SQNR (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from ..quantization.heldout import quant_report
    from ..quantization.report import progress_bar

    summary = quant_report(args.model, args.out, args.scans, tuple(args.schemes), args.observer, args.n_cal,
                           args.calibration, args.positions, args.layer_patterns,
                           progress=progress_bar(args.no_progress))
    print(f"report: {args.out / 'report.md'}")
    for sch, agg in summary["aggregate"].items():
        ok = "within" if agg["met"] else "OUTSIDE"
        print(f"  {sch:9s} Δ phase NRMSE mean {agg['delta_phase_nrmse_mean']:+.4f}, max |Δ| "
              f"{agg['delta_phase_nrmse_max']:.4f} ({ok} budget {agg['budget']}), Δ FRC "
              f"{agg['delta_frc_nm_mean']:+.2f} nm")
    return 0
