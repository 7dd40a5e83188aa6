"""`edgeptycho reconstruct`: infer every pattern of a CXI scan on a HAL backend, stitch, write a CXI reconstruction."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

# The Gaussian stand-in for a scan without a probe: intensity FWHM = 90 %-energy diameter / 1.82.
GAUSSIAN_DIAMETER_PER_FWHM = 1.82


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scan", type=Path, help="raw CXI scan (edgeptycho simulate, or a beamline's CXI)")
    parser.add_argument("--model", default="default",
                        help="zoo name or .onnx path (default: %(default)s); 'none' = iterative only, from a flat object")
    parser.add_argument("--backend", default="cpu", help="HAL backend (edgeptycho backends lists them)")
    parser.add_argument("--precision", default="fp32", help="backend precision (fp32, fp16, int8)")
    parser.add_argument("--batch", type=int, default=32, help="inference batch size")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for the backend and the refinement's FFTs (default: all cores)")
    parser.add_argument("--stitch", choices=("lsq", "greedy", "none"), default="lsq",
                        help="phase-offset reconciliation between overlapping patches")
    parser.add_argument("--remove-ramp", choices=("auto", "yes", "no"), default="auto",
                        help="take the global phase ramp out of the stitched object; auto (default): only for an "
                             "int8 model, which tilts its patches (removal also takes the object's own ramp: "
                             "docs/pipeline.md, \"Phase ramp\")")
    parser.add_argument("--refine-iters", type=int, default=0, metavar="N",
                        help="N mPIE iterations seeded by the CNN's stitched object and the scan's probe "
                             "(default 0; with --model none: default 200, the last quarter with annealed steps)")
    parser.add_argument("--refine-method", choices=("mpie", "rpie", "epie"), default=None,
                        help="iterative algorithm (default: mpie; rpie for a probe estimated from the data); "
                             "see docs/refinement.md")
    parser.add_argument("--out", type=Path, required=True, help="output CXI reconstruction")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar for the refinement's iterations (shown on stderr otherwise)")


def stitch_weight(artifact: Any, probe: np.ndarray | None, frame_size: int) -> tuple[np.ndarray, str]:
    """Blending weight (M, M): |probe|² summed over modes, central M×M of the window; without a probe, a
    Gaussian whose 90 %-energy diameter is the middle of the model's training beam range."""
    from ..physics.probes import gaussian_probe
    from ..pipeline.stitcher import probe_weight

    m = artifact.output_size
    if probe is not None:
        return probe_weight(probe, m), "scan probe"
    beam = artifact.metadata.get("architecture", {}).get("data", {}).get("beam_px", [m * 0.8, m * 0.8])
    diameter = 0.5 * (float(beam[0]) + float(beam[1]))
    g = gaussian_probe(max(frame_size, m), diameter / GAUSSIAN_DIAMETER_PER_FWHM)
    return probe_weight(g[None], m), f"Gaussian, {diameter:.0f} px (model's nominal beam)"


def check_geometry(artifact: Any, frame_size: int) -> float:
    """Model pixel ÷ scan full-frame pixel; the frame size must be the one the model was trained on."""
    want = int(artifact.metadata.get("frame_size", frame_size))
    if frame_size != want:
        raise ValueError(f"model '{artifact.name}' was trained on {want}-px frames (preprocess "
                         f"{artifact.preprocess.to_dict()}); this scan has {frame_size}-px frames")
    return artifact.preprocess.pixel_size_factor(frame_size)


def infer_scan(scan: Any, artifact: Any, backend: str = "cpu", batch: int = 32, precision: str = "fp32",
               on_batch: Any = None, **opts: Any) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Amplitude and phase patches (N, M, M) float32 of every frame; preprocessing writes straight into the
    backend's input batch. Returns (amplitude, phase, seconds per stage). `on_batch(s, frames, amp, phase)`
    sees each batch's raw frames while they are in memory (the residual of reconstruct_scan)."""
    from ..hw import open_backend
    from ..model.preprocess import preprocess_into

    n, m = scan.n_frames, artifact.output_size
    amp = np.empty((n, m, m), np.float32)
    phase = np.empty((n, m, m), np.float32)
    times = {"read": 0.0, "preprocess": 0.0, "infer": 0.0}
    with open_backend(backend, artifact.path, batch, precision, **opts) as be:
        frames_of: dict[int, np.ndarray] = {}  # a batch's raw frames, for on_batch, until its results are in

        def fill(k: int, inputs: np.ndarray) -> int:
            s, e = k * batch, min(n, (k + 1) * batch)
            t0 = time.perf_counter()
            frames = frames_of[k] = np.asarray(scan.frames[s:e])
            t1 = time.perf_counter()
            preprocess_into(frames, inputs, artifact.preprocess, scan.mask, be.input_spec.scale)
            times["read"] += t1 - t0
            times["preprocess"] += time.perf_counter() - t1
            return e - s

        def done(k: int, out: dict[str, np.ndarray], rows: int) -> None:
            s = k * batch
            amp[s:s + rows] = out["amplitude"][:rows, 0]
            phase[s:s + rows] = out["phase"][:rows, 0]
            frames = frames_of.pop(k)
            if on_batch is not None:  # timed apart: the inference figures stay comparable
                t0 = time.perf_counter()
                on_batch(s, frames, amp[s:s + rows], phase[s:s + rows])
                times["residual"] = times.get("residual", 0.0) + time.perf_counter() - t0

        t0 = time.perf_counter()
        be.run_batches(-(-n // batch), fill, done)
        # inference: the loop's time less reading, preprocessing and residuals (batch k+1 overlaps batch k)
        times["infer"] = time.perf_counter() - t0 - times["read"] - times["preprocess"] - times.get("residual", 0.0)
    return amp, phase, times


def reconstruct_scan(scan: Any, model: str | Path = "default", backend: str = "cpu", batch: int = 32,
                     precision: str = "fp32", method: str = "lsq", keep: dict | None = None,
                     residual_every: int = 1, remove_ramp: bool | str = "auto", **opts: Any) -> tuple[Any, dict[str, float]]:
    """A ScanData (frames may be on disk) → a stitched Reconstruction and the seconds spent per stage.

    `keep`: a dict that receives the StitchResult ("stitch", with the uncertainty's feature maps) and the
    per-frame residuals ("residual", None without a probe) for benchmarks. `residual_every`: the residual
    (for the uncertainty map) of one frame in N only, as the live pipeline's `quality.every` (others NaN).
    `remove_ramp`: True, False or "auto" (pipeline.stitcher.ramp_removal: only for an int8 model).
    """
    from ..model.artifact import ModelArtifact
    from ..physics.types import Reconstruction
    from ..pipeline.stitcher import ramp_removal, stitch

    t0 = time.perf_counter()
    art = ModelArtifact.load(model)
    factor = check_geometry(art, scan.frame_size)
    dx = scan.object_pixel_m * factor
    t_load = time.perf_counter() - t0
    residual = on_batch = None
    from ..pipeline.uncertainty import residual_used

    # the residual needs the probe on the patch's pixel grid; a caller keeping it (benchmarks) gets it anyway
    if scan.probe is not None and factor == 1 and (residual_used() or keep is not None):
        from ..pipeline.quality import ForwardResidual

        fr = ForwardResidual(scan.probe, art.output_size, mask=scan.mask)
        residual = np.full(scan.n_frames, np.nan, np.float32)

        def on_batch(s: int, frames: np.ndarray, a: np.ndarray, p: np.ndarray) -> None:  # for the σ map
            k = np.arange((-s) % residual_every, len(a), residual_every)
            if k.size:
                residual[s + k] = fr(frames[k], a[k], p[k])
    amp, phase, times = infer_scan(scan, art, backend, batch, precision, on_batch, **opts)
    t1 = time.perf_counter()
    weight, weight_source = stitch_weight(art, scan.probe, scan.frame_size)
    res = stitch(amp, phase, scan.positions_m / dx, weight, method=method, residual=residual,
                 remove_ramp=ramp_removal(remove_ramp, art.metadata))
    times = {"load_model": t_load, **times, "stitch": time.perf_counter() - t1}
    if keep is not None:
        keep.update(stitch=res, residual=residual)
    recon = Reconstruction(
        object=res.object, pixel_m=dx, positions_m=scan.positions_m,
        origin_m=(res.origin_px[0] * dx, res.origin_px[1] * dx), uncertainty=res.uncertainty,
        metrics={f"seconds_{k}": v for k, v in times.items()} | {"n_frames": scan.n_frames},
        program={"program": "edgeptycho reconstruct", "model": art.name, "model_sha256": art.sha256,
                 "backend": backend, "precision": precision, "stitch": method, "stitch_weight": weight_source,
                 "phase_ramp_removed_rad_per_px": [float(v) for v in res.ramp]},
    )
    return recon, times


@contextmanager
def _iteration_bar(n_iters: int, disable: bool) -> Iterator[Callable[[int, float], None] | None]:
    """A tqdm bar over the refinement's sweeps, showing the Fourier misfit (None when disabled)."""
    if disable:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=n_iters, desc="refine", unit="it", leave=False)

    def on_iteration(iteration: int, misfit: float) -> None:
        bar.set_postfix_str(f"misfit {misfit:.4g}", refresh=False)
        bar.update(1)

    try:
        yield on_iteration
    finally:
        bar.close()


def run(args: argparse.Namespace) -> int:
    from ..io.cxi import open_scan, write_reconstruction
    from ..pipeline.refine import refine

    if args.refine_iters < 0:
        raise ValueError(f"--refine-iters must be >= 0, got {args.refine_iters}")
    iterative_only = str(args.model).lower() == "none"
    n_iters = args.refine_iters or (200 if iterative_only else 0)
    opts = {"threads": args.threads} if args.threads else {}
    t0 = time.perf_counter()
    with open_scan(args.scan) as scan:
        times: dict[str, float] = {}
        recon = None
        if not iterative_only:
            recon, times = reconstruct_scan(scan, args.model, args.backend, args.batch, args.precision,
                                            args.stitch, remove_ramp={"yes": True, "no": False}.get(args.remove_ramp, "auto"),
                                            **opts)
        if n_iters:
            # Refinement sweeps every frame many times: read them from disk once.
            t_r = time.perf_counter()
            seed_program = recon.program if recon is not None else {"program": "edgeptycho reconstruct", "model": "none"}
            overrides: dict[str, Any] = {"method": args.refine_method} if args.refine_method else {}
            if args.threads:
                overrides["workers"] = args.threads  # scipy.fft threads of the solver
            with _iteration_bar(n_iters, args.no_progress) as on_iteration:
                refined = refine(scan.to_scan(), recon, n_iters=n_iters, callback=on_iteration, **overrides)
            refined.program = {**seed_program, **refined.program, "refine_iters": str(n_iters)}
            refined.metrics = {**(recon.metrics if recon is not None else {}), **refined.metrics}
            times["refine"] = time.perf_counter() - t_r
            recon = refined
        t1 = time.perf_counter()
        command = "edgeptycho " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        write_reconstruction(args.out, recon, scan, command=command)
        times["write"] = time.perf_counter() - t1
        n = scan.n_frames
    total = time.perf_counter() - t0
    method = str(recon.program.get("method", "")).replace("pie", "PIE")  # as refine() ran it: ePIE, rPIE, mPIE
    how = f"model {recon.program.get('model', 'none')} on {args.backend}" if not iterative_only else f"{method} only"
    print(f"reconstructed {n} frames with {how}" + (f" + {n_iters} {method} iterations" if n_iters and not iterative_only
                                                    else f", {n_iters} iterations" if n_iters else "") + f" → {args.out}")
    for k, v in times.items():
        print(f"  {k:<11s} {v * 1e3:9.1f} ms")
    rate = f"  ({n / times['infer']:.0f} patterns/s inference)" if times.get("infer") else ""
    print(f"  {'total':<11s} {total * 1e3:9.1f} ms{rate}")
    return 0
