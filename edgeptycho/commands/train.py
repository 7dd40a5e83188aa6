"""`edgeptycho train`: train a CNN preset on a simulated training set (CPU, deterministic, resumable)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..model.network import preset_names

    parser.add_argument("--preset", required=True, metavar="NAME",
                        help=f"model preset: {', '.join(preset_names())} (or a preset YAML path)")
    parser.add_argument("--data", type=Path, required=True, help="dataset directory (edgeptycho dataset)")
    parser.add_argument("--out", type=Path, required=True, help="run directory: checkpoints, history, loss curve")
    parser.add_argument("--epochs", type=int, help="epochs (default: the preset's recipe)")
    parser.add_argument("--batch", type=int, help="batch size (default: the preset's recipe)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: the preset's recipe)")
    parser.add_argument("--resume", type=Path, metavar="CKPT", help="continue from a last.pt checkpoint")
    parser.add_argument("--init", metavar="CKPT",
                        help="start from these weights with a fresh optimiser and schedule: a best.pt/last.pt, an "
                             ".onnx model or a zoo name (e.g. default), of the preset's architecture or of a "
                             "narrower one of the family (widened without changing its outputs); specialises a "
                             "broad model on a narrower training set, or grows a shipped one")
    parser.add_argument("--seed", type=int, default=0, help="random seed (weights and batch order)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--val-shards", type=int, help="held-out shards for validation (default: the recipe's fraction)")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (smoke tests)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..model.network import load_preset
    from ..model.train import CHECKPOINT_BEST, TrainSettings, train

    preset = load_preset(args.preset)
    t = preset.training
    settings = TrainSettings(epochs=args.epochs or t.epochs, batch=args.batch or t.batch, lr=args.lr or t.lr,
                             seed=args.seed, threads=args.threads, max_steps=args.max_steps,
                             val_shards=args.val_shards)
    command = "edgeptycho train " + " ".join(shlex.quote(a) for a in sys.argv[sys.argv.index("train") + 1:]) \
        if "train" in sys.argv else ""
    result = train(preset, args.data, args.out, settings, resume=args.resume, init=args.init, progress=not args.no_progress,
                   reproduce=[command] if command else None)
    print(f"best validation loss {result.best_val:.4f} at epoch {result.best_epoch}: "
          f"{args.out / CHECKPOINT_BEST}; loss curve {args.out / 'loss_curve.png'}")
    return 0
