"""`edgeptycho evaluate`: score a reconstruction file against a simulated scan's ground truth."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..io.cxi import jsonable, open_scan, read_reconstruction
from ..io.ptychodus import read_product
from ..physics.types import Reconstruction


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recon", type=Path,
                        help="reconstruction: CXI (ours or ptychodus'), a ptychodus product (.h5/.npz), or a "
                             "simulated scan CXI, whose own ground truth is then scored")
    parser.add_argument("--truth", type=Path, required=True,
                        help="simulated scan CXI holding the ground truth at entry_1/sample_1/object_truth")
    parser.add_argument("--edge-px", type=float, default=10.0,
                        help="width of the illuminated region's edge band, in object pixels, for "
                             "phase_nrmse_interior (the region without it) and edge_error_share (default 10)")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")


def load_reconstruction(path: Path) -> Reconstruction:
    """A reconstruction from a CXI file (or a scan's ground truth) or from a ptychodus product file."""
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix.lower() == ".npz":
        return read_product(path)
    try:
        with h5py.File(path, "r") as f:
            is_cxi = "cxi_version" in f or "entry_1" in f
    except OSError as exc:
        raise ValueError(f"{path}: neither a CXI file nor a ptychodus product ({exc})") from exc
    return read_reconstruction(path, allow_truth=True) if is_cxi else read_product(path)


def _table(result: dict[str, Any], recon_path: Path, truth_path: Path, source: str) -> str:
    lines = [f"reconstruction: {recon_path} ({source})", f"ground truth:   {truth_path}"]
    width = max((len(k) for k in result), default=0)
    for key, value in result.items():
        if isinstance(value, (float, np.floating)):
            # resolutions and pixel sizes in metres read better in nm
            text = f"{value * 1e9:.2f} nm" if key.endswith("_m") else f"{value:.5g}"
        elif isinstance(value, (int, np.integer, str, bool)):
            text = str(value)
        elif value is None:
            text = "n/a"
        else:
            continue  # curves (FRC, …) go to --json only
        lines.append(f"  {key:<{width}}  {text}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..physics.metrics import evaluate

    recon = load_reconstruction(args.recon)
    with open_scan(args.truth) as scan_file:
        if scan_file.object_truth is None:
            raise ValueError(f"{args.truth}: no ground truth at entry_1/sample_1/object_truth "
                             "(only simulated scans carry one)")
        # The metrics need the truth, positions and probe, not the frames: those stay on disk.
        result = evaluate(recon, scan_file, edge_px=args.edge_px)
    if args.json:
        print(json.dumps(jsonable(result), indent=2))
    else:
        print(_table(result, args.recon, args.truth, recon.program.get("program", "unknown program")))
    return 0
