"""`edgeptycho dataset`: generate a sharded simulated training set (preprocessed patterns + labels) with a manifest."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..model.network import preset_names

    parser.add_argument("--preset-model", required=True, metavar="NAME",
                        help=f"model preset whose input/output sizes and physics ranges to use: "
                             f"{', '.join(preset_names())} (or a preset YAML path)")
    parser.add_argument("--n", type=int, required=True, help="number of training pairs")
    parser.add_argument("--out", type=Path, required=True, help="output directory (must not hold a dataset)")
    parser.add_argument("--seed", type=int, default=0, help="random seed: same seed → identical shards")
    parser.add_argument("--shard-size", type=int, default=4096, help="pairs per shard (multiple of 256)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (the data do not depend on it)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..model.dataset import generate

    t0 = time.perf_counter()
    info = generate(args.preset_model, args.n, args.out, seed=args.seed, shard_size=args.shard_size,
                    workers=args.workers, progress=not args.no_progress)
    dt = time.perf_counter() - t0
    print(f"wrote {info.n} pairs in {len(info.shards)} shards to {info.out} ({dt:.1f} s, "
          f"{info.n / dt:.0f} pairs/s); manifest {info.out / 'manifest.json'}")
    return 0
