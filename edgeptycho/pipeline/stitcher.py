"""Stitch CNN object patches into one complex mosaic: probe-weighted blending with phase-offset reconciliation.

Geometry (DESIGN.md): a position (row, col) is the centre of the probe window in object pixels; an M×M patch
covers object pixels round(pos) − M//2 … + M − 1; canvas pixel (r, c) is object pixel (r, c) + origin_px.

Choices, measured (docs/pipeline.md, "Stitching"; benchmarks/bench_pipeline.py --only stitch / stitch-cnn):
- sub-pixel: `stitch` Fourier-shifts each patch by its fractional offset before placing it at the nearest
  pixel (true patches: complex NRMSE 0.010 vs 0.040 rounded, ~25 % more time); LiveStitcher only rounds.
- offsets: one pattern does not fix its patch's constant phase. H_ij = Σ conj(u_i)·u_j over the overlap
  (u = weight·patch; one sparse product UᴴU) gives arg H_ij ≈ o_j − o_i with confidence |H_ij|.
  "lsq" (default): maximum-spanning-tree seed, then weighted least squares on wrapped residuals (graph
  Laplacian, sparse LU); "greedy": scan order + Gauss–Seidel; LiveStitcher: greedy against the mosaic.
- phase ramp: a CNN tilting every patch makes the solve build a ramp across the mosaic; `remove_ramp`
  measures it from H and removes it when significant (LiveStitcher: the same fit from its offsets,
  ramp_from_pairs). The fit also holds the object's own mean phase gradient (patches are referenced to their
  mean phase), so it is only worth removing for a model that tilts: `ramp_removal` says when (int8 models).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import scipy.sparse.csgraph as csgraph
import scipy.sparse.linalg as spla

from .uncertainty import features, sigma_from_features

# A pixel whose summed weight is below this fraction of the weight's peak is outside the scanned area.
MIN_WEIGHT_FRACTION = 1e-3
# Overlap sums are estimated on canvas pixels on a sub-grid of this many samples across a patch: a
# constant phase difference needs far fewer than M² samples, and this bounds the sparse product's cost.
# 16 rather than 32: a 1000-patch stitch 0.41 → 0.30 s, held-out stitched phase NRMSE within ±0.0002.
PAIR_SAMPLES = 16


@dataclass
class StitchResult:
    """Stitched object (H, W) complex64, summed weight (H, W), per-patch phase offsets removed (N,) rad."""

    object: np.ndarray
    weight: np.ndarray
    offsets: np.ndarray
    origin_px: tuple[int, int] = (0, 0)  # object pixel of canvas pixel (0, 0)
    ramp: tuple[float, float] = (0.0, 0.0)  # global phase ramp removed, rad per object pixel (row, col)
    uncertainty: np.ndarray | None = None  # (H, W) float32 phase σ, rad (pipeline.uncertainty); NaN outside
    features: dict[str, np.ndarray] | None = None  # the σ model's per-pixel inputs (uncertainty.features)

    @property
    def mask(self) -> np.ndarray:
        """Pixels any patch covered with a usable weight."""
        return self.weight > MIN_WEIGHT_FRACTION * max(float(self.weight.max(initial=0.0)), 1e-30)


def probe_weight(probe: np.ndarray, m: int) -> np.ndarray:
    """Blending weight (M, M): total probe intensity Σ_k |P_k|² over the central M×M window, peak 1."""
    p = np.asarray(probe)
    if p.ndim == 2:
        p = p[None]
    n = p.shape[-1]
    if m > n:
        raise ValueError(f"patch size {m} larger than the probe window {n}")
    r0 = n // 2 - m // 2
    w = (np.abs(p[:, r0:r0 + m, r0:r0 + m]) ** 2).sum(axis=0)
    peak = float(w.max())
    if peak <= 0:
        raise ValueError("probe is zero everywhere; cannot build a blending weight")
    return (w / peak).astype(np.float32)


def patch_corners(positions_px: np.ndarray, m: int) -> np.ndarray:
    """Top-left object pixel (N, 2) int of each M×M patch centred on its (sub-pixel) position."""
    pos = np.asarray(positions_px, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2:
        raise ValueError(f"positions_px must be (N, 2) (row, col), got shape {pos.shape}")
    return np.floor(pos + 0.5).astype(np.int64) - m // 2


def canvas_for(positions_px: np.ndarray, m: int, margin: int = 0) -> tuple[tuple[int, int], tuple[int, int]]:
    """(canvas shape, origin object pixel) that holds every M×M patch at `positions_px`, plus `margin` px."""
    corners = patch_corners(positions_px, m)
    corners = corners[(corners > -(1 << 40)).all(axis=1)]  # NaN positions cast to huge negatives: skip
    if len(corners) == 0:
        raise ValueError("no finite positions: cannot size a canvas")
    lo = corners.min(axis=0) - margin
    hi = corners.max(axis=0) + m + margin
    return (int(hi[0] - lo[0]), int(hi[1] - lo[1])), (int(lo[0]), int(lo[1]))


def _check_patches(amplitude: np.ndarray, phase: np.ndarray, positions_px: np.ndarray, weight: np.ndarray):
    amplitude = np.asarray(amplitude, dtype=np.float32)
    phase = np.asarray(phase, dtype=np.float32)
    if amplitude.ndim == 4 and amplitude.shape[1] == 1:  # (N, 1, M, M) straight from the model
        amplitude, phase = amplitude[:, 0], phase[:, 0]
    if amplitude.ndim != 3 or amplitude.shape[1] != amplitude.shape[2]:
        raise ValueError(f"amplitude must be (N, M, M), got shape {amplitude.shape}")
    if phase.shape != amplitude.shape:
        raise ValueError(f"phase shape {phase.shape} differs from amplitude shape {amplitude.shape}")
    m = amplitude.shape[-1]
    if np.shape(weight) != (m, m):
        raise ValueError(f"weight must be ({m}, {m}) like the patches, got shape {np.shape(weight)}")
    if len(positions_px) != len(amplitude):
        raise ValueError(f"{len(positions_px)} positions for {len(amplitude)} patches")
    return amplitude, phase, np.asarray(weight, dtype=np.float32)


def weighted_complex(amplitude: np.ndarray, phase: np.ndarray, weight: np.ndarray | None = None) -> np.ndarray:
    """weight·amplitude·e^{i·phase} as complex64 from float32 cos/sin (20x faster than a complex exp)."""
    a = amplitude if weight is None else amplitude * weight
    c = np.cos(phase)
    c *= a
    s = np.sin(phase)
    s *= a
    u = np.empty(amplitude.shape, dtype=np.complex64)
    v = u.view(np.float32).reshape(*amplitude.shape, 2)  # interleave once: strided in-place math is slower
    v[..., 0] = c
    v[..., 1] = s
    return u


def _subpixel_shift(patches: np.ndarray, positions_px: np.ndarray) -> np.ndarray:
    from edgeptycho.physics.fourier import fourier_shift

    pos = np.asarray(positions_px, dtype=np.float64)
    frac = pos - np.floor(pos + 0.5)  # the patch is placed at the rounded position; shift content by frac
    return fourier_shift(patches, frac).astype(np.complex64)


def _flat_indices(corners: np.ndarray, m: int, shape: tuple[int, int], stride: int = 1):
    """Canvas flat index of every patch pixel (N, k) and its in-canvas mask, sampling a global sub-grid."""
    ar = np.arange(m)
    rows = corners[:, 0, None] + ar[None]  # (N, M)
    cols = corners[:, 1, None] + ar[None]
    if stride > 1:  # keep pixels on the same global grid for every patch so products stay co-located
        keep_r = (rows % stride) == 0
        keep_c = (cols % stride) == 0
    else:
        keep_r = keep_c = np.ones_like(rows, dtype=bool)
    inside = (rows >= 0) & (rows < shape[0]) & keep_r
    inside_c = (cols >= 0) & (cols < shape[1]) & keep_c
    flat = rows[:, :, None] * shape[1] + cols[:, None, :]
    mask = inside[:, :, None] & inside_c[:, None, :]
    return flat, mask


def overlap_matrix(u: np.ndarray, corners: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """Hermitian sparse H (N, N): H_ij = Σ conj(u_i)·u_j over the canvas pixels both patches cover."""
    n, m = u.shape[0], u.shape[-1]
    stride = max(1, m // PAIR_SAMPLES)
    flat, mask = _flat_indices(corners, m, shape, stride)
    rows = np.broadcast_to(np.arange(n)[:, None, None], flat.shape)[mask]
    cols = flat[mask]
    U = sp.csr_matrix((u[mask].astype(np.complex128), (rows, cols)), shape=(n, shape[0] * shape[1]))
    return (U.conj() @ U.T).tocsr()


def _tree_offsets(c: sp.csr_matrix, delta: sp.csr_matrix, n: int) -> np.ndarray:
    """Offsets propagated along a maximum spanning tree of the confidence graph (one root per component)."""
    dist = c.copy()
    dist.data = 1.0 / (dist.data + 1e-300)  # strongest overlaps = shortest edges
    tree = csgraph.minimum_spanning_tree(dist)
    tree = tree + tree.T
    off = [0.0] * n
    seen = np.zeros(n, dtype=bool)
    delta = delta.tocsr()
    for root in range(n):
        if seen[root]:
            continue
        order, pred = csgraph.breadth_first_order(tree, root, directed=False, return_predecessors=True)
        child = order[1:]
        seen[order] = True
        if not len(child):  # an isolated patch keeps offset 0 (and sparse indexing by empty arrays is a scalar)
            continue
        step = np.asarray(delta[pred[child], child]).ravel().tolist()  # delta_ij = o_j - o_i, one lookup
        for j, i, d in zip(child.tolist(), pred[child].tolist(), step, strict=True):  # parents first (BFS)
            off[j] = off[i] + d
    return np.asarray(off)


def _wrap(x: np.ndarray) -> np.ndarray:
    return np.angle(np.exp(1j * x))


def _edges(H: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Overlapping pairs i < j and their H_ij."""
    upper = sp.triu(H, k=1).tocoo()
    keep = np.abs(upper.data) > 0
    return upper.row[keep], upper.col[keep], upper.data[keep]


def solve_offsets_lsq(H: sp.csr_matrix, iterations: int = 3) -> np.ndarray:
    """Weighted least squares on wrapped pairwise phase differences; offsets o with o_j − o_i ≈ arg H_ij."""
    n = H.shape[0]
    i, j, h = _edges(H)
    if len(h) == 0:
        return np.zeros(n)
    c = np.abs(h)
    d = np.angle(h)
    conf = sp.csr_matrix((c, (i, j)), shape=(n, n))
    delta = sp.csr_matrix((d, (i, j)), shape=(n, n))
    delta = delta - delta.T  # delta_ji = -delta_ij
    offsets = _tree_offsets(conf + conf.T, delta, n)
    # Laplacian L = Bᵀ C B with B the signed incidence matrix; a tiny ridge fixes each component's gauge.
    e = len(c)
    B = sp.csr_matrix((np.r_[-np.ones(e), np.ones(e)], (np.r_[np.arange(e), np.arange(e)], np.r_[i, j])),
                      shape=(e, n))
    L = (B.T @ sp.diags(c) @ B).tocsc()
    L = L + sp.identity(n, format="csc") * (1e-9 * c.max())
    solve = spla.factorized(L)
    for _ in range(iterations):
        r = _wrap(d - (offsets[j] - offsets[i]))
        step = solve(B.T @ (c * r))
        offsets += step
        if np.max(np.abs(step)) < 1e-6:
            break
    return offsets


def phase_ramp(H: sp.csr_matrix, positions_px: np.ndarray) -> tuple[float, float]:
    """Phase slope (rad/px along row, col) that reconciling these patches builds across the mosaic.

    A patch tilted by g rad/px (a CNN's systematic bias inside every patch) makes neighbours differ by
    arg H_ij ≈ −g·(X_j − X_i) beyond their content; the offset solve integrates that into a mosaic ramp of
    +g. Measured as the weighted LS slope of arg H_ij (before reconciliation) against X_j − X_i, negated.
    """
    i, j, h = _edges(H)
    if len(h) < 3:
        return 0.0, 0.0
    d = np.asarray(positions_px, dtype=np.float64)
    return ramp_from_pairs(d[j] - d[i], np.angle(h), np.abs(h) / np.abs(h).max())


RAMP_SETTINGS = (True, False, "auto")


def ramp_removal(setting: bool | str, model_metadata: dict | None = None) -> bool:
    """Whether to remove the mosaic's phase ramp: `setting` True/False, or "auto": only for an int8-quantized
    model. Those tilt their patches (2–7e-4 rad/px against their FP32 parent, docs/pipeline.md "Phase ramp"),
    while the FP32 model hardly does, and removal also takes away the object's own ramp."""
    if setting not in RAMP_SETTINGS:
        raise ValueError(f"remove_ramp must be true, false or 'auto', got {setting!r}")
    if setting != "auto":
        return bool(setting)
    quant = (model_metadata or {}).get("quantization") or {}
    return str(quant.get("precision", "")).lower() == "int8"


def ramp_from_pairs(dpos: np.ndarray, delta: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """The slope (rad/px, row, col) of phase_ramp from pairs: displacement (E, 2), phase difference
    o_j − o_i (E,) wrapped, confidence (E,); (0, 0) unless significant (also LiveStitcher's, from offsets)."""
    if len(delta) < 3:
        return 0.0, 0.0
    A = dpos * w[:, None]
    normal = dpos.T @ A
    if np.linalg.cond(normal) > 1e12:  # positions along one line only: the slope across it is unknown
        return 0.0, 0.0
    slope = np.linalg.solve(normal, A.T @ delta)
    # Only a significant slope is removed: patches that do not share the CNN's phase reference (arbitrary
    # offsets) give differences with no trend, whose fitted slope is noise (|t| < 4 here).
    resid = delta - dpos @ slope
    var = float((w * resid**2).sum() / max(len(delta) - 2, 1))
    se = np.sqrt(np.diag(np.linalg.inv(normal)) * var)
    if np.all(np.abs(slope) < 4 * se):
        return 0.0, 0.0
    return -float(slope[0]), -float(slope[1])


def solve_offsets_greedy(H: sp.csr_matrix, order: np.ndarray | None = None, sweeps: int = 5) -> np.ndarray:
    """Scan-order alignment (each patch to the ones before it) followed by Gauss–Seidel sweeps."""
    n = H.shape[0]
    Hc = H.conj().tocsr()  # row i of conj(H): Σ_j conj(H_ij) z_j estimates e^{i o_i}
    Hc.setdiag(0)
    Hc.eliminate_zeros()
    indptr, indices, data = Hc.indptr, Hc.indices, Hc.data
    z = np.zeros(n, dtype=np.complex128)
    order = np.arange(n) if order is None else np.asarray(order)
    for sweep in range(sweeps + 1):
        for i in order:
            s = np.dot(data[indptr[i]:indptr[i + 1]], z[indices[indptr[i]:indptr[i + 1]]])
            a = abs(s)
            if a > 0:
                z[i] = s / a
            elif sweep == 0:
                z[i] = 1.0
    return np.angle(z)


def stitch(
    amplitude: np.ndarray,
    phase: np.ndarray,
    positions_px: np.ndarray,
    weight: np.ndarray,
    canvas_shape: tuple[int, int] | None = None,
    method: str = "lsq",
    subpixel: bool = True,
    origin_px: tuple[int, int] | None = None,
    remove_ramp: bool = False,
    chunk: int = 256,
    residual: np.ndarray | None = None,
) -> StitchResult:
    """Blend patches (N, M, M) at `positions_px` (N, 2) into one object: Σ w·patch / Σ w, offsets reconciled.

    Canvas pixel (r, c) is object pixel (r, c) + origin_px. Defaults: with no `canvas_shape` the canvas
    starts at object pixel (0, 0) (lower if a patch reaches below 0) and covers every patch; with a
    `canvas_shape` the origin is (0, 0). Parts of patches outside the canvas are dropped.
    `method`: "lsq" (default), "greedy", or "none" (patches already share a phase reference).
    `remove_ramp`: after reconciling offsets, remove the global linear phase ramp (phase_ramp). That slope
    is the model's per-patch tilt plus the object's own mean phase gradient, which goes with it; for the
    shipped model (per-axis tilt under 3e-4 rad/px, within 2 standard errors of 0) removing it cost
    accuracy, so it is off by default (docs/pipeline.md, "Phase ramp").
    `residual`: (N,) data-consistency residual per patch (NaN = unknown), mapped into the uncertainty.
    """
    amplitude, phase, weight = _check_patches(amplitude, phase, positions_px, weight)
    if method not in ("lsq", "greedy", "none"):
        raise ValueError(f"method must be 'lsq', 'greedy' or 'none', got {method!r}")
    n, m = amplitude.shape[0], amplitude.shape[-1]
    corners = patch_corners(positions_px, m)
    if canvas_shape is None:
        if n == 0:
            raise ValueError("no patches and no canvas_shape: nothing to stitch")
        _, lo = canvas_for(positions_px, m)
        origin = np.minimum(np.asarray(lo), 0) if origin_px is None else np.asarray(origin_px, np.int64)
        shape = tuple(int(v) for v in corners.max(axis=0) + m - origin)
    else:
        origin = np.zeros(2, np.int64) if origin_px is None else np.asarray(origin_px, np.int64)
        shape = (int(canvas_shape[0]), int(canvas_shape[1]))
    corners = corners - origin
    if subpixel:
        u = _subpixel_shift(weighted_complex(amplitude, phase), positions_px) * weight
    else:
        u = weighted_complex(amplitude, phase, weight)

    offsets = np.zeros(n)
    ramp = (0.0, 0.0)
    if method != "none" and n > 1:
        H = overlap_matrix(u, corners, shape)
        offsets = solve_offsets_lsq(H) if method == "lsq" else solve_offsets_greedy(H)
        # Gauge: remove the circular mean offset so the mosaic keeps the patches' own phase reference.
        offsets = _wrap(offsets - np.angle(np.exp(1j * offsets).sum()))
        if remove_ramp:
            ramp = phase_ramp(H, positions_px)

    num_re = np.zeros(shape[0] * shape[1])
    num_im = np.zeros_like(num_re)
    den = np.zeros_like(num_re)
    sq = np.zeros_like(num_re)  # Σ w·|z|² for the overlap-disagreement map (offset-free: |z| has no phase)
    if residual is not None:
        residual = np.asarray(residual, np.float64).ravel()
        if residual.shape != (n,):
            raise ValueError(f"residual must be ({n},) like the patches, got shape {residual.shape}")
        rknown = np.isfinite(residual)
        rval = np.where(rknown, residual, 0.0)
        rnum, rden = np.zeros_like(num_re), np.zeros_like(num_re)  # Σ w·r, Σ w over patches with a residual
    rot = np.exp(-1j * offsets).astype(np.complex64)
    wb = np.broadcast_to(weight, (min(chunk, max(n, 1)), m, m))
    for s in range(0, n, chunk):  # chunks bound the index arrays' memory for long scans
        e = min(n, s + chunk)
        flat, mask = _flat_indices(corners[s:e], m, shape)
        idx = flat[mask]
        val = (u[s:e] * rot[s:e, None, None])[mask]
        num_re += np.bincount(idx, weights=val.real, minlength=len(num_re))
        num_im += np.bincount(idx, weights=val.imag, minlength=len(num_re))
        den += np.bincount(idx, weights=wb[: e - s][mask], minlength=len(num_re))
        us = np.abs(u[s:e][mask]) ** 2  # |w·z|² / w = w·|z|², with the sub-pixel-shifted z the mean uses
        ws = wb[: e - s][mask]
        sq += np.bincount(idx, weights=np.divide(us, ws, out=np.zeros_like(us), where=ws > 1e-6),
                          minlength=len(num_re))
        if residual is not None:
            pid = np.broadcast_to(np.arange(s, e)[:, None, None], mask.shape)[mask]
            wk = ws * rknown[pid]
            rnum += np.bincount(idx, weights=wk * rval[pid], minlength=len(num_re))
            rden += np.bincount(idx, weights=wk, minlength=len(num_re))
    den = den.reshape(shape)
    feats = features((num_re + 1j * num_im).reshape(shape), den, sq.reshape(shape), float(weight.max()),
                     None if residual is None else rnum.reshape(shape),
                     None if residual is None else rden.reshape(shape),
                     float(np.median(residual[rknown])) if residual is not None and rknown.any() else None)
    sigma = sigma_from_features(feats)
    obj = np.zeros(shape, dtype=np.complex64)
    good = den > MIN_WEIGHT_FRACTION * max(float(den.max(initial=0.0)), 1e-30)
    obj[good] = (num_re.reshape(shape)[good] + 1j * num_im.reshape(shape)[good]) / den[good]
    if ramp != (0.0, 0.0):  # separable: e^{-i(a·r + b·c)} = e^{-i a·r} ⊗ e^{-i b·c}, about the scan centre
        centre = np.asarray(positions_px, dtype=np.float64).mean(axis=0) - origin
        er = np.exp(-1j * ramp[0] * (np.arange(shape[0]) - centre[0])).astype(np.complex64)
        ec = np.exp(-1j * ramp[1] * (np.arange(shape[1]) - centre[1])).astype(np.complex64)
        obj *= er[:, None] * ec[None, :]
    return StitchResult(obj, den.astype(np.float32), offsets.astype(np.float64),
                        (int(origin[0]), int(origin[1])), ramp, sigma, feats)


# LiveStitcher lives in live_stitch.py (it imports the helpers above); re-exported for existing imports.
from .live_stitch import LiveStitcher  # noqa: E402, F401
