"""`edgeptycho simulate`: a preset or YAML simulation spec → a CXI scan file with probe and ground truth."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..config import ConfigError, from_mapping, load_yaml
from ..io.cxi import COMPRESSIONS, write_scan
from ..physics.simulate import PRESET_NAMES, SimulationSpec, preset, simulate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--preset", metavar="NAME", help=f"one of: {', '.join(PRESET_NAMES)}")
    src.add_argument("--config", type=Path, metavar="FILE.yaml",
                     help="simulation spec in YAML: sections geometry, probe, object, scan, noise; may start "
                          "from `preset: NAME` and override fields, and may set `seed:`")
    parser.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: the YAML's seed, else 0)")
    parser.add_argument("--positions", type=int, metavar="N", help="override scan.n_positions")
    parser.add_argument("--dose", type=float, metavar="D", help="override noise.dose (incident photons/pattern)")
    parser.add_argument("--out", type=Path, metavar="scan.cxi", help="output CXI file")
    parser.add_argument("--compression", choices=COMPRESSIONS, default="gzip",
                        help="frame compression (default gzip; lz4 and bslz4 need hdf5plugin to read back)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `over` into a copy of `base`; unknown keys are kept so that validation names them."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def build_spec(preset_name: str | None, config: Path | None, positions: int | None = None,
               dose: float | None = None) -> tuple[SimulationSpec, int | None]:
    """The spec from a preset and/or a YAML file plus command-line overrides; also the YAML's seed."""
    data: dict[str, Any] = load_yaml(config) if config else {}
    seed = data.pop("seed", None)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"'seed': expected an integer, got {seed!r}")
    name = data.pop("preset", preset_name)
    if name is None and config is None:
        raise ConfigError("give --preset NAME or --config FILE.yaml (--list-presets shows the presets)")
    if name is not None:
        if name not in PRESET_NAMES:
            raise ConfigError(f"unknown preset '{name}'; choose one of {', '.join(PRESET_NAMES)}")
        base = preset(name).to_dict()
        obj = data.get("object")
        if isinstance(obj, dict) and obj.get("kind", base["object"]["kind"]) != base["object"]["kind"]:
            base["object"]["params"] = {}  # params are kind-specific: a new kind starts from its own defaults
        data = _merge(base, data)
    if positions is not None:
        data = _merge(data, {"scan": {"n_positions": positions}})
    if dose is not None:
        data = _merge(data, {"noise": {"dose": dose}})
    spec = from_mapping(SimulationSpec, data)
    return spec, seed


def _list_presets() -> None:
    for name in PRESET_NAMES:
        s = preset(name)
        g = s.geometry
        print(f"{name:<13} {s.object.kind:<13} {s.scan.kind} scan, {s.scan.n_positions} positions, "
              f"{g.frame_size}² frames, {g.object_pixel_m * 1e9:.1f} nm pixels, {s.probe.kind} probe "
              f"({s.probe.n_modes} modes), dose {f'{s.noise.dose:.3g}' if s.noise.dose else 'noise-free'}")


def run(args: argparse.Namespace) -> int:
    if args.list_presets:
        _list_presets()
        return 0
    if args.out is None:
        raise ValueError("--out scan.cxi is required")
    spec, yaml_seed = build_spec(args.preset, args.config, args.positions, args.dose)
    seed = args.seed if args.seed is not None else (yaml_seed or 0)

    t0 = time.perf_counter()
    bar = None
    if not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=spec.scan.n_positions, unit="frame", desc=f"simulate {spec.name}", leave=False)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        scan = simulate(spec, seed=seed, progress=progress if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    path = write_scan(args.out, scan, compression=args.compression)
    elapsed = time.perf_counter() - t0
    meta = scan.metadata
    dose = "noise-free" if meta.get("noise_free") else f"{meta.get('dose', spec.noise.dose):.3g} photons/pattern"
    h, w = scan.object_truth.shape if scan.object_truth is not None else (0, 0)
    print(f"Wrote {path}: {scan.n_frames} frames of {scan.frame_size}×{scan.frame_size} px at "
          f"{scan.n_frames} {spec.scan.kind} positions (seed {seed}, preset/spec '{spec.name}'), object "
          f"{spec.object.kind} {h}×{w} px at {scan.object_pixel_m * 1e9:.2f} nm/px, "
          f"{scan.probe.shape[0] if scan.probe is not None else 0} probe modes, dose {dose} "
          f"(mean {meta.get('mean_counts', float('nan')):.3g} counts/frame), "
          f"{path.stat().st_size / 1e6:.2f} MB ({args.compression}), {elapsed:.1f} s.")
    return 0
