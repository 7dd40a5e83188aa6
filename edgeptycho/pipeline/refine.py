"""Iterative refinement of a scan or of regions of it (CNN seed + N ePIE/rPIE sweeps), locally or on Dask.

refine() is the hybrid step: a stitched CNN object (or a flat one, for the full iterative reference) plus
`n_iters` sweeps of physics.epie. With a region, only the positions whose probe footprint touches it are
used, on a crop of the object around them, and only the region's pixels are written back. refine_tiled()
cuts the scanned field into tiles and sends each tile's sub-problem to a Dask cluster (a LocalCluster on
127.0.0.1 by default, or a scheduler address), then pastes the tiles back into one mosaic.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..physics.epie import Callback, EpieOptions, estimate_probe, solve
from ..physics.forward import window_starts
from ..physics.probes import fit_to_frame, probe_diameter_px
from ..physics.types import Reconstruction, ScanData

Region = tuple[float, float, float, float]  # (y0, y1, x0, x1) in metres, same frame as scan positions


@dataclass
class SubProblem:
    """One self-contained refinement job: arrays only, cheap to ship to a worker."""

    frames: np.ndarray          # (M, n, n) detector order
    positions_px: np.ndarray    # (M, 2) on the crop's grid
    probe: np.ndarray           # (K, n, n)
    obj: np.ndarray             # (h, w) crop of the seed object
    corner: tuple[int, int]     # crop pixel (0, 0) on the full grid
    paste: tuple[int, int, int, int]  # rows r0:r1, cols c0:c1 of the full grid to write back (region)
    mask: np.ndarray | None = None


def _seed(scan: ScanData, object_init: Reconstruction | np.ndarray | None, dx: float) -> tuple[np.ndarray, np.ndarray]:
    """Seed object (complex64) and its origin (2,) in metres; holes (NaN, zero amplitude) become 1."""
    if object_init is None:
        if scan.object_truth is not None:  # the truth's grid: results compare with it pixel for pixel
            return np.ones(np.shape(scan.object_truth), np.complex64), np.zeros(2)
        return np.ones((1, 1), np.complex64), np.asarray(scan.positions_m.min(0), np.float64)
    if isinstance(object_init, Reconstruction):
        if abs(object_init.pixel_m / dx - 1.0) > 1e-3:
            raise ValueError(f"object_init pixel {object_init.pixel_m:.4g} m differs from the scan's object pixel "
                             f"{dx:.4g} m: resample the seed to the full-frame pixel first")
        obj, origin = np.asarray(object_init.object), np.asarray(object_init.origin_m, np.float64)
    else:
        obj, origin = np.asarray(object_init), np.zeros(2)
    if obj.ndim != 2:
        raise ValueError(f"object_init must be a 2-D complex object, got shape {obj.shape}")
    obj = obj.astype(np.complex64)  # a copy: the caller's seed is never modified
    obj[~np.isfinite(obj) | (np.abs(obj) == 0)] = 1.0  # a stitched mosaic leaves unvisited pixels empty
    return obj, origin


def _fit(obj: np.ndarray, origin: np.ndarray, positions_m: np.ndarray, n: int, dx: float):
    """Pad the seed with ones until every n×n scan window lies inside; returns (object, origin, positions px)."""
    pos = positions_m / dx - origin / dx
    lo = np.floor(pos).astype(np.int64).min(0) - n // 2
    hi = np.floor(pos).astype(np.int64).max(0) - n // 2 + n
    pad_lo = np.maximum(-lo, 0)
    pad_hi = np.maximum(hi - np.array(obj.shape), 0)
    if pad_lo.any() or pad_hi.any():
        obj = np.pad(obj, ((pad_lo[0], pad_hi[0]), (pad_lo[1], pad_hi[1])), constant_values=1.0)
        origin = origin - pad_lo * dx
        pos = pos + pad_lo
    return obj, origin, pos


def _probe(scan: ScanData, probe_init: np.ndarray | str | None) -> np.ndarray:
    n = scan.frame_size
    if probe_init is None:
        probe_init = scan.probe if scan.probe is not None else "estimate"
    if isinstance(probe_init, str):
        if probe_init != "estimate":
            raise ValueError(f"probe_init must be an array, None (the scan's) or 'estimate', got {probe_init!r}")
        return estimate_probe(scan.frames)
    p = np.asarray(probe_init)
    return fit_to_frame(p[None] if p.ndim == 2 else p, n)


def footprint_radius_px(probe: np.ndarray) -> float:
    """Half the probe's 90 %-intensity diameter plus 2 px: how far from a position its illumination matters."""
    return 0.5 * probe_diameter_px(probe) + 2.0


def region_pixels(region: Region, origin_m: np.ndarray, dx: float, shape: tuple[int, int]) -> tuple[int, ...]:
    """(y0, y1, x0, x1) m → clipped pixel box (r0, r1, c0, c1) on a grid; an empty box is an error."""
    y0, y1, x0, x1 = region
    r0, c0 = np.floor((np.array([y0, x0]) - origin_m) / dx).astype(int)
    r1, c1 = np.ceil((np.array([y1, x1]) - origin_m) / dx).astype(int)
    r0, r1 = max(r0, 0), min(r1, shape[0])
    c0, c1 = max(c0, 0), min(c1, shape[1])
    if r1 <= r0 or c1 <= c0:
        raise ValueError(f"region {region} m does not overlap the object grid")
    return int(r0), int(r1), int(c0), int(c1)


def sub_problem(frames: np.ndarray, pos: np.ndarray, probe: np.ndarray, obj: np.ndarray,
                box: tuple[int, int, int, int], mask: np.ndarray | None = None) -> SubProblem:
    """The positions whose probe footprint touches pixel box (r0, r1, c0, c1), on a crop holding their windows."""
    n = probe.shape[-1]
    r0, r1, c0, c1 = box
    rad = footprint_radius_px(probe)
    near = ((pos[:, 0] + rad >= r0) & (pos[:, 0] - rad < r1) & (pos[:, 1] + rad >= c0) & (pos[:, 1] - rad < c1))
    idx = np.flatnonzero(near)
    if idx.size == 0:
        raise ValueError(f"no scan position illuminates the region rows {r0}:{r1}, cols {c0}:{c1}")
    starts, _ = window_starts(pos[idx], n, obj.shape)
    lo = starts.min(0)
    hi = starts.max(0) + n
    crop = obj[lo[0]:hi[0], lo[1]:hi[1]].copy()
    # write back only pixels both in the region and under some window of the crop
    paste = (max(r0, int(lo[0])), min(r1, int(hi[0])), max(c0, int(lo[1])), min(c1, int(hi[1])))
    return SubProblem(np.asarray(frames[idx]), pos[idx] - lo, probe, crop, (int(lo[0]), int(lo[1])), paste, mask)


def solve_sub(job: SubProblem, n_iters: int, options: EpieOptions,
              callback: Callback | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run one sub-problem (on a worker); returns the refined region pixels, probe and convergence."""
    res = solve(job.frames, job.positions_px, job.probe, job.obj, n_iters, options, job.mask, callback=callback)
    r0, r1, c0, c1 = job.paste
    rr, cc = job.corner
    seed = job.obj[r0 - rr:r1 - rr, c0 - cc:c1 - cc]
    out = res.object[r0 - rr:r1 - rr, c0 - cc:c1 - cc]
    # a free global phase may drift while the probe is updated: keep the seed's, so tiles join seamlessly
    dot = np.vdot(out, seed)
    if abs(dot) > 0:
        out = out * np.complex64(dot / abs(dot))
    return out, res.probe, res.convergence


FLAT_ANNEAL_FRACTION = 0.25  # from flat: the object step decays over the last quarter of the iterations ...
FLAT_ANNEAL_TO = 0.1         # ... to a tenth, which averages the shot noise of many positions (BENCHMARKS)


def flat_options(n_iters: int, base: EpieOptions | None = None) -> EpieOptions:
    """Options for a full reconstruction from a flat object: `base` with the final step annealing."""
    return replace(base or EpieOptions(), anneal_iters=int(n_iters * FLAT_ANNEAL_FRACTION), anneal_to=FLAT_ANNEAL_TO)


def _options(scan: ScanData, object_init, probe_init, options: EpieOptions | None, n_iters: int,
             overrides: dict) -> EpieOptions:
    """The caller's options, or the defaults for the case: an estimated probe is updated from the start with
    plain rPIE and a conservative object step (a far-off probe makes the small-alpha batched update
    unstable); a flat start anneals its last steps (flat_options); a seeded refinement runs mPIE as is."""
    estimated = (isinstance(probe_init, str) and probe_init == "estimate") or (probe_init is None
                                                                               and scan.probe is None)
    if options is not None:
        base = options
    elif estimated:
        base = EpieOptions(method="rpie", probe_update_start=0, alpha=0.25)
    elif object_init is None:
        base = flat_options(n_iters)
    else:
        base = EpieOptions()
    return replace(base, **overrides)


def _prepare(scan: ScanData, object_init, probe_init):
    dx = scan.object_pixel_m
    obj, origin = _seed(scan, object_init, dx)
    obj, origin, pos = _fit(obj, origin, np.asarray(scan.positions_m, np.float64), scan.frame_size, dx)
    return obj, origin, pos, _probe(scan, probe_init), dx


def _recon(obj, origin, pos, dx, probe, conv, seconds, options, n_iters, what) -> Reconstruction:
    return Reconstruction(
        object=obj, pixel_m=dx, positions_m=(pos * dx + origin), probe=probe, origin_m=(float(origin[0]),
                                                                                        float(origin[1])),
        metrics={"refine_seconds": float(seconds), "refine_iterations": float(n_iters)},
        convergence=conv, program={"program": "edgeptycho.refine", "method": options.method, "scope": what})


def refine(scan: ScanData, object_init: Reconstruction | np.ndarray | None = None,
           probe_init: np.ndarray | str | None = None, n_iters: int = 10, region: Region | None = None,
           options: EpieOptions | None = None, callback: Callback | None = None,
           **overrides: Any) -> Reconstruction:
    """Refine a seed object with `n_iters` ePIE/rPIE sweeps → Reconstruction on the seed's grid (padded to fit).

    object_init: the stitched CNN Reconstruction (its origin_m places it), a bare array on the scan's grid
    (origin 0), or None for a flat object (the full iterative reconstruction). probe_init: None = the scan's
    probe (estimated from the mean pattern if it has none; an estimated probe is then updated from the first
    iteration), "estimate", or (K, n, n) modes. region: (y0, y1,
    x0, x1) metres; only positions illuminating it are used and only its pixels change. `overrides` set
    EpieOptions fields (method, alpha, batch_size, probe_update_start, backend, …). callback(iteration,
    misfit) after each sweep, for progress displays.
    """
    opts = _options(scan, object_init, probe_init, options, n_iters, overrides)
    t0 = time.perf_counter()
    obj, origin, pos, probe, dx = _prepare(scan, object_init, probe_init)
    if region is None:
        res = solve(scan.frames, pos, probe, obj, n_iters, opts, scan.mask, callback=callback)
        return _recon(res.object, origin, res.positions_px, dx, res.probe, res.convergence,
                      time.perf_counter() - t0, opts, n_iters, "scan")
    box = region_pixels(region, origin, dx, obj.shape)
    job = sub_problem(scan.frames, pos, probe, obj, box, scan.mask)
    out, new_probe, conv = solve_sub(job, n_iters, opts, callback)
    obj[box[0]:box[1], box[2]:box[3]] = out
    return _recon(obj, origin, pos, dx, new_probe, conv, time.perf_counter() - t0, opts, n_iters, "region")


def tiles(shape: tuple[int, int], tile_px: int) -> list[tuple[int, int, int, int]]:
    """Pixel boxes (r0, r1, c0, c1) covering a grid in tiles of at most tile_px × tile_px."""
    if tile_px < 1:
        raise ValueError(f"tile size must be >= 1 px, got {tile_px}")
    return [(r, min(r + tile_px, shape[0]), c, min(c + tile_px, shape[1]))
            for r in range(0, shape[0], tile_px) for c in range(0, shape[1], tile_px)]


def dask_client(address: str | None = None, n_workers: int = 2, threads_per_worker: int = 1):
    """A distributed Client: to `address` (tcp://host:port) or to a new LocalCluster bound to 127.0.0.1.

    Dask moves task arguments with pickle: use it only among machines you trust (the local default is).
    """
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise RuntimeError("the Dask tier needs dask.distributed: pip install 'dask[distributed]'") from exc
    if address:
        return Client(address)
    cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
                           host="127.0.0.1", dashboard_address=None)
    return Client(cluster)


def refine_tiled(scan: ScanData, object_init: Reconstruction | np.ndarray | None = None,
                 probe_init: np.ndarray | str | None = None, n_iters: int = 10, tile_px: int = 128,
                 client: Any = None, address: str | None = None, n_workers: int = 2,
                 options: EpieOptions | None = None, **overrides: Any) -> Reconstruction:
    """Refine every illuminated tile of the scan as an independent Dask job and merge them into one mosaic.

    Each job carries only its tile's frames, positions and object crop. `client`: an existing
    distributed.Client; else one is made from `address` (or a LocalCluster of `n_workers`) and closed after.
    Tiles that no position illuminates keep the seed. The convergence returned is the mean over tiles.
    """
    opts = _options(scan, object_init, probe_init, options, n_iters, overrides)
    t0 = time.perf_counter()
    obj, origin, pos, probe, dx = _prepare(scan, object_init, probe_init)
    jobs = []
    for box in tiles(obj.shape, tile_px):
        try:
            jobs.append(sub_problem(scan.frames, pos, probe, obj, box, scan.mask))
        except ValueError:  # nothing illuminates this tile
            continue
    own = client is None
    client = client or dask_client(address, n_workers)
    try:
        futures = client.map(solve_sub, jobs, n_iters=n_iters, options=opts, pure=False)
        results = client.gather(futures)
    finally:
        if own:
            cluster = getattr(client, "cluster", None)
            client.close()
            if cluster is not None:
                cluster.close()
    convs = []
    for job, (out, _probe, conv) in zip(jobs, results, strict=True):
        r0, r1, c0, c1 = job.paste
        obj[r0:r1, c0:c1] = out
        convs.append(conv)
    conv = np.mean(convs, axis=0) if convs else np.zeros(0)
    return _recon(obj, origin, pos, dx, probe, conv, time.perf_counter() - t0, opts, n_iters, "tiled")
