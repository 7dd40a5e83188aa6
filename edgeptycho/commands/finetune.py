"""`edgeptycho finetune`: fine-tune a model on a raw CXI scan with labels from its iterative reconstruction."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="zoo name or .onnx path to start from")
    parser.add_argument("--scan", type=Path, required=True, help="raw CXI scan (frames + positions)")
    parser.add_argument("--truth", type=Path, required=True,
                        help="iterative reconstruction CXI at the model's pixel (a simulated scan's own file "
                             "may be given: its ground truth is then used)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (checkpoint, ONNX, report)")
    parser.add_argument("--holdout", type=float, default=0.2, help="fraction of positions held out as a spatial block")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", help="name of the fine-tuned model (default: MODEL-ft)")


def run(args: argparse.Namespace) -> int:
    from ..io.cxi import read_reconstruction, read_scan
    from ..model.finetune import FinetuneSettings, finetune

    scan = read_scan(args.scan)
    recon = read_reconstruction(args.truth, allow_truth=True)
    settings = FinetuneSettings(epochs=args.epochs, batch=args.batch, lr=args.lr, holdout=args.holdout,
                                seed=args.seed, threads=args.threads)
    command = "edgeptycho " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    art, report = finetune(args.model, scan, recon, args.out, settings, name=args.name, reproduce=[command])
    (args.out / "finetune_report.json").write_text(json.dumps(report, indent=2) + "\n")
    b, a = report["heldout_before"], report["heldout_after"]
    print(f"held-out spatial block ({report['n_heldout']} patterns): phase RMS {b['phase_rms_rad']:.4f} → "
          f"{a['phase_rms_rad']:.4f} rad, weighted L1 {b['loss']:.4f} → {a['loss']:.4f}; model {art.path}")
    return 0
