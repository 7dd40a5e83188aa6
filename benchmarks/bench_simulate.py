"""Benchmark: simulated scan throughput (positions/s) of the forward model and the full simulate() call.

    python benchmarks/bench_simulate.py [--preset siemens-star] [--positions 1000] [--repeat 3]

Prints the median over repeats of: diffraction_intensity alone (all probe modes), add_noise alone and the
whole simulate() (probe, scan, object, intensities, noise) in positions per second.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from edgeptycho.physics import forward
from edgeptycho.physics.simulate import PRESET_NAMES, preset, simulate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="siemens-star", choices=PRESET_NAMES)
    ap.add_argument("--positions", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    spec = preset(args.preset).replace(scan={"n_positions": args.positions})
    n_pos = spec.scan.n_positions
    scan = simulate(spec, seed=0)  # warm-up, and the inputs for the per-stage timings
    probe, obj, pos = scan.probe, scan.object_truth, scan.positions_px()
    t_int, t_noise, t_all = [], [], []
    for r in range(args.repeat):
        t0 = time.perf_counter()
        inten = forward.diffraction_intensity(obj, probe, pos)
        t1 = time.perf_counter()
        forward.add_noise(inten, float(inten.sum(axis=(1, 2)).mean()), rng=r)
        t2 = time.perf_counter()
        simulate(spec, seed=r + 1)
        t3 = time.perf_counter()
        t_int.append(t1 - t0)
        t_noise.append(t2 - t1)
        t_all.append(t3 - t2)
    n = spec.geometry.frame_size
    print(f"{args.preset}: {n_pos} positions, {n}x{n} frames, {probe.shape[0]} modes, object {obj.shape}, "
          f"{os.cpu_count()} CPUs, median of {args.repeat}")
    for name, ts in (("diffraction_intensity", t_int), ("add_noise (Poisson)", t_noise), ("simulate (total)", t_all)):
        med = statistics.median(ts)
        print(f"  {name:<22} {med:7.2f} s  {n_pos / med:8.0f} positions/s  (min {min(ts):.2f} s)")


if __name__ == "__main__":
    main()
