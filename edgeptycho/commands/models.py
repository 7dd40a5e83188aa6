"""`edgeptycho models`: the shipped models (zoo) and the architecture presets, with parameters and FLOPs."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", action="store_true", help="list the architecture presets instead")
    parser.add_argument("--json", action="store_true", help="print JSON")


def preset_table() -> list[dict]:
    from ..model.network import count_parameters, flops, load_preset, preset_names

    rows = []
    for name in preset_names():
        p = load_preset(name)
        rows.append({"name": name, "frame": p.frame_size, "bin": p.preprocess.bin,
                     "input": p.network.input_size, "output": p.network.output_size,
                     "parameters": count_parameters(p.network), "gflop": flops(p.network) / 1e9,
                     "upsample": p.network.upsample, "description": p.description})
    return rows


def model_table() -> list[dict]:
    from ..model.artifact import ZOO, list_models

    aliases = json.loads((ZOO / "aliases.json").read_text()) if (ZOO / "aliases.json").is_file() else {}
    rows = []
    for m in list_models():
        metrics = m.get("metrics", {})
        rows.append({"name": m["name"], "aliases": [a for a, t in aliases.items() if t == m["name"]],
                     "version": m["version"], "input": m["input_size"], "output": m["output_size"],
                     "bin": m["preprocess"].get("bin"), "parameters": m.get("parameters"),
                     "gflop": (m.get("flops") or 0) / 1e9, "val_loss": metrics.get("val_loss"),
                     "phase_nrmse": metrics.get("stitched_phase_nrmse"), "sha256": m["sha256"][:12]})
    return rows


def run(args: argparse.Namespace) -> int:
    rows = preset_table() if args.presets else model_table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no models shipped in edgeptycho/model/zoo")
        return 0
    if args.presets:
        w = max(12, *(len(r["name"]) for r in rows))
        print(f"{'preset':<{w}} {'frame':>5} {'bin':>3} {'in':>4} {'out':>4} {'params':>10} {'GFLOP':>7}  upsample")
        for r in rows:
            print(f"{r['name']:<{w}} {r['frame']:>5} {r['bin']:>3} {r['input']:>4} {r['output']:>4} "
                  f"{r['parameters']:>10,} {r['gflop']:>7.3f}  {r['upsample']}")
        return 0
    print(f"{'model':<14} {'aliases':<10} {'in':>4} {'out':>4} {'bin':>3} {'params':>10} {'GFLOP':>7} "
          f"{'val loss':>8} {'phase NRMSE':>11}  sha256")
    for r in rows:
        nrmse = f"{r['phase_nrmse']:.3f}" if isinstance(r["phase_nrmse"], (int, float)) else "-"
        val = f"{r['val_loss']:.4f}" if isinstance(r["val_loss"], (int, float)) else "-"
        print(f"{r['name']:<14} {','.join(r['aliases']) or '-':<10} {r['input']:>4} {r['output']:>4} "
              f"{r['bin']:>3} {r['parameters'] or 0:>10,} {r['gflop']:>7.3f} {val:>8} {nrmse:>11}  {r['sha256']}")
    return 0
