"""One entry point, `edgeptycho <command>`: a table of commands, each a module in edgeptycho/commands/."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name → (module under edgeptycho.commands, one-line help). Modules are imported only when their command
# runs, so `edgeptycho --help` stays fast and a missing optional extra breaks only its own command.
COMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("simulate", "simulate a ptychographic scan (preset or YAML) into a CXI file with ground truth"),
    "simulate-detector": ("simulate_detector", "stream a CXI scan or synthetic frames as a DECTRIS detector (SIMPLON stream v1/v2)"),
    "evaluate": ("evaluate", "score a reconstruction against ground truth (NRMSE, SSIM, FRC resolution)"),
    "dataset": ("dataset", "generate a sharded simulated training set with a manifest"),
    "train": ("train", "train a CNN preset on a simulated training set"),
    "finetune": ("finetune", "fine-tune a model on a raw CXI scan plus its iterative reconstruction"),
    "export": ("export", "export a checkpoint to ONNX (dynamic batch) and check it against PyTorch"),
    "models": ("models", "list the shipped models with their metadata"),
    "reconstruct": ("reconstruct", "infer every pattern of a CXI scan, stitch, and write a CXI reconstruction"),
    "calibrate": ("calibrate", "quantize a model (dpu-pow2, trt-int8, fp16) on calibration patterns into an artifact"),
    "quant-report": ("quant_report", "report int8/fp16 accuracy vs FP32 on held-out simulated scans (Markdown + plots)"),
    "backends": ("backends", "list every HAL backend with its availability, reason and fix"),
    "serve": ("serve", "run the streaming service from a YAML config until stopped"),
    "demo": ("demo", "simulate a Siemens-star scan and stream it through the service on the CPU backend"),
    "bench": ("bench", "benchmarks: backend throughput, pipeline efficiency, simulation speed"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeptycho",
        description="Real-time streaming ptychographic phase retrieval on edge hardware.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = build_parser()
    # Parse only the global options and the command name; the command module owns the rest.
    idx = next((i for i, a in enumerate(argv) if a in COMMANDS), None)
    if idx is None:
        top.parse_args(argv)  # handles --help and reports unknown commands
        top.print_help()
        return 2
    glob = top.parse_args(argv[:idx])
    name = argv[idx]
    logging.basicConfig(
        level=logging.WARNING - 10 * min(glob.verbose + 1, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    module = importlib.import_module(f"edgeptycho.commands.{COMMANDS[name][0]}")
    parser = argparse.ArgumentParser(prog=f"edgeptycho {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(argv[idx + 1:])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # User-facing errors (bad config, missing file, unavailable backend) print one clear line.
        if glob.verbose:
            raise
        print(f"edgeptycho {name}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
