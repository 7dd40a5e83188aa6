"""The one implementation of the quality metrics: illuminated mask, complex/phase NRMSE, SSIM, FRC, evaluate()."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.fft as sfft
from scipy.ndimage import distance_transform_edt, gaussian_filter
from scipy.signal import fftconvolve
from scipy.signal.windows import tukey

from .fourier import fourier_shift
from .types import Reconstruction, ScanData


def _wrap(p: np.ndarray) -> np.ndarray:
    """Wrap angles to (−π, π]."""
    return np.pi - np.mod(np.pi - p, 2 * np.pi)


def _select(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    x = np.asarray(x)
    if mask is None:
        return x.ravel()
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != x.shape:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {x.shape}")
    return x[mask]


def illuminated_mask(shape: tuple[int, int], probe_modes: np.ndarray, positions_px: np.ndarray,
                     threshold: float = 0.1) -> np.ndarray:
    """Boolean (H, W): pixels where some scan position's probe intensity reaches `threshold` × its peak.

    The probe intensity Σ_k |P_k|² is thresholded at `threshold` of its maximum (its footprint), and the
    footprints are placed with the window centre (index n//2) on each position rounded to the nearest pixel.
    Windows may run past the edges of `shape` (e.g. a reconstruction grid smaller than the scan).
    """
    probe = np.asarray(probe_modes)
    probe = probe[None] if probe.ndim == 2 else probe
    inten = np.sum(np.abs(probe) ** 2, axis=0)
    if inten.max() <= 0:
        raise ValueError("probe has no intensity")
    foot = (inten >= threshold * inten.max()).astype(np.float64)
    n0, n1 = foot.shape
    h, w = shape
    pos = np.rint(np.asarray(positions_px, dtype=np.float64)).astype(np.int64)
    # deltas on a canvas padded by a window on every side, then one FFT convolution with the footprint
    canvas = np.zeros((h + 2 * n0, w + 2 * n1))
    idx = pos + np.array([n0, n1])
    ok = (idx[:, 0] >= 0) & (idx[:, 0] < canvas.shape[0]) & (idx[:, 1] >= 0) & (idx[:, 1] < canvas.shape[1])
    np.add.at(canvas, (idx[ok, 0], idx[ok, 1]), 1.0)
    full = fftconvolve(canvas, foot, mode="full")
    r0, c0 = n0 + n0 // 2, n1 + n1 // 2  # footprint index k from a delta at p lands on object pixel p − n//2 + k
    return full[r0 : r0 + h, c0 : c0 + w] > 0.5


def complex_nrmse(x: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> float:
    """min over c ∈ ℂ of ‖c·x − ref‖ / ‖ref‖ over the mask (global phase and scale removed).

    The optimum is c = ⟨x, ref⟩ / ⟨x, x⟩. Returns nan when the reference is zero over the mask.
    """
    xs = _select(x, mask).astype(np.complex128)
    rs = _select(ref, mask).astype(np.complex128)
    norm_ref = np.linalg.norm(rs)
    if norm_ref == 0:
        return float("nan")
    xx = np.vdot(xs, xs).real
    c = np.vdot(xs, rs) / xx if xx > 0 else 0.0
    return float(np.linalg.norm(c * xs - rs) / norm_ref)


def _phase(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    return np.angle(x) if np.iscomplexobj(x) else x.astype(np.float64)


def phase_nrmse(x: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> float:
    """RMS(wrap(φ − φ_ref − offset)) / (max φ_ref − min φ_ref) over the mask.

    offset = circular mean of φ − φ_ref over the mask (the global phase). x and ref are complex fields (their
    angles are used, so a reference whose phase wraps should be passed as an unwrapped real phase map) or
    real phase maps in radians. Returns nan when the reference phase is constant over the mask.
    """
    p = _select(_phase(x), mask)
    pr = _select(_phase(ref), mask)
    span = float(pr.max() - pr.min()) if pr.size else 0.0
    if span == 0:
        return float("nan")
    d = p - pr
    offset = np.angle(np.mean(np.exp(1j * d)))
    return float(np.sqrt(np.mean(_wrap(d - offset) ** 2)) / span)


def align_phase(x: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """x's phase expressed as φ_ref + wrap(φ − φ_ref − offset): offset removed, no 2π jumps against ref."""
    p, pr = _phase(x), _phase(ref)
    d = p - pr
    offset = np.angle(np.mean(np.exp(1j * _select(d, mask))))
    return pr + _wrap(d - offset)


def ssim(x: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None, sigma: float = 1.5,
         data_range: float | None = None) -> float:
    """Mean structural similarity (Wang et al. 2004) of real images with an 11-tap Gaussian window (σ = 1.5).

    K1 = 0.01, K2 = 0.03; data_range defaults to the reference's max − min over the mask. With a mask the local
    statistics are normalised convolutions over masked pixels only and the SSIM map is averaged over the mask.
    """
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if np.iscomplexobj(x) or np.iscomplexobj(ref) or x.shape != ref.shape:
        raise ValueError("ssim needs two real images of the same shape")
    m = np.ones(x.shape) if mask is None else np.asarray(mask, dtype=np.float64)
    if m.shape != x.shape or not m.any():
        raise ValueError("ssim mask must match the image shape and select at least one pixel")
    sel = m > 0
    rng = data_range if data_range is not None else float(ref[sel].max() - ref[sel].min()) or 1.0
    c1, c2 = (0.01 * rng) ** 2, (0.03 * rng) ** 2

    def blur(a: np.ndarray) -> np.ndarray:
        return gaussian_filter(a * m, sigma, truncate=3.5, mode="reflect")

    wsum = np.maximum(blur(np.ones_like(x)), 1e-12)
    mx, my = blur(x) / wsum, blur(ref) / wsum
    vx = blur(x * x) / wsum - mx * mx
    vy = blur(ref * ref) / wsum - my * my
    cxy = blur(x * ref) / wsum - mx * my
    smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(smap[sel].mean())


class FRCResult(NamedTuple):
    freq: np.ndarray        # ring frequency, cycles per pixel (0 … 0.5)
    frc: np.ndarray         # correlation per ring
    threshold: np.ndarray   # half-bit threshold per ring
    n_pixels: np.ndarray    # pixels per ring


def frc(a: np.ndarray, b: np.ndarray, alpha: float = 0.25) -> FRCResult:
    """Fourier ring correlation of two images (real or complex) with the half-bit threshold.

    Both are cropped to their central square, mean-subtracted and apodised by a Tukey window (flat centre,
    cosine edges of fraction `alpha`: removes the edge discontinuity with little spectral smearing).
    Half-bit curve (van Heel & Schatz 2005): (0.2071 + 1.9102/√n) / (1.2071 + 0.9102/√n), n = pixels per ring.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"frc needs two 2-D images of the same shape, got {a.shape} and {b.shape}")
    n = min(a.shape)
    if n < 8:
        raise ValueError(f"frc needs images of at least 8x8 pixels, got {a.shape}")
    r0, c0 = (a.shape[0] - n) // 2, (a.shape[1] - n) // 2
    win = tukey(n, alpha)
    win = win[:, None] * win[None, :]
    fa, fb = (sfft.fftshift(sfft.fft2((im[r0 : r0 + n, c0 : c0 + n] - im[r0 : r0 + n, c0 : c0 + n].mean()) * win))
              for im in (a, b))
    k = np.arange(n) - n // 2
    ring = np.rint(np.hypot(k[:, None], k[None, :])).astype(np.int64).ravel()
    keep = ring <= n // 2
    ring = ring[keep]
    num = np.bincount(ring, (fa * fb.conj()).real.ravel()[keep])
    da = np.bincount(ring, (np.abs(fa) ** 2).ravel()[keep])
    db = np.bincount(ring, (np.abs(fb) ** 2).ravel()[keep])
    counts = np.bincount(ring)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = num / np.sqrt(da * db)
    sq = np.sqrt(counts)
    thr = (0.2071 + 1.9102 / sq) / (1.2071 + 0.9102 / sq)
    return FRCResult(np.arange(len(counts)) / n, corr, thr, counts)


def frc_crossing(a: np.ndarray, b: np.ndarray, alpha: float = 0.25) -> tuple[float, bool]:
    """(frequency in cycles/px of the first half-bit crossing, crossed?). Never crossed → (0.5, False)."""
    res = frc(a, b, alpha)
    d = np.nan_to_num(res.frc, nan=1.0) - res.threshold
    below = np.flatnonzero(d[1:] < 0) + 1
    if below.size == 0:
        return 0.5, False
    r = int(below[0])
    if r == 1:
        return float(res.freq[1]), True
    t = d[r - 1] / (d[r - 1] - d[r])  # linear interpolation between the last ring above and the first below
    return float(res.freq[r - 1] + t * (res.freq[r] - res.freq[r - 1])), True


def frc_resolution(a: np.ndarray, b: np.ndarray, pixel_m: float, alpha: float = 0.25) -> float:
    """Half-pitch resolution (m) = pixel / (2·f) at the FRC half-bit crossing f; the Nyquist half-pitch
    (one pixel) when the curves never cross (frc_crossing tells which)."""
    f, _ = frc_crossing(a, b, alpha)
    return float(pixel_m / (2.0 * f))


def _resample(img: np.ndarray, ratio: float) -> tuple[np.ndarray, float, str]:
    """Resample to a pixel `ratio` × larger; returns (image, grid origin in old pixels, method)."""
    b = int(round(ratio))
    if b >= 2 and abs(ratio - b) < 1e-3:  # integer ratio: block averaging, exactly a b×b coarser detector pixel
        h, w = (img.shape[0] // b) * b, (img.shape[1] // b) * b
        out = img[:h, :w].reshape(h // b, b, w // b, b).mean(axis=(1, 3))
        return out, (b - 1) / 2.0, "block-average"
    # otherwise Fourier cropping (or zero-padding): band-limited resampling, sample 0 stays at position 0
    h, w = img.shape
    nh, nw = max(1, int(round(h / ratio))), max(1, int(round(w / ratio)))
    spec = sfft.fftshift(sfft.fft2(img))
    out = np.zeros((nh, nw), np.complex128)
    ch, cw = min(h, nh), min(w, nw)
    out[nh // 2 - ch // 2 : nh // 2 - ch // 2 + ch, nw // 2 - cw // 2 : nw // 2 - cw // 2 + cw] = \
        spec[h // 2 - ch // 2 : h // 2 - ch // 2 + ch, w // 2 - cw // 2 : w // 2 - cw // 2 + cw]
    res = sfft.ifft2(sfft.ifftshift(out)) * (nh * nw) / (h * w)
    return (res if np.iscomplexobj(img) else res.real), 0.0, "fourier"


def _inscribed_square(mask: np.ndarray) -> tuple[slice, slice] | None:
    """Largest square about the mask's centroid lying wholly inside the mask (for FRC), or None if < 16 px."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    cy, cx = int(round(ys.mean())), int(round(xs.mean()))
    lo, hi = 0, min(mask.shape) // 2 + 1
    while lo < hi:  # binary search on the half-side
        mid = (lo + hi + 1) // 2
        r0, r1, c0, c1 = cy - mid, cy + mid, cx - mid, cx + mid
        inside = r0 >= 0 and c0 >= 0 and r1 <= mask.shape[0] and c1 <= mask.shape[1]
        if inside and mask[r0:r1, c0:c1].all():
            lo = mid
        else:
            hi = mid - 1
    return (slice(cy - lo, cy + lo), slice(cx - lo, cx + lo)) if 2 * lo >= 16 else None


def edge_breakdown(x: np.ndarray, ref: np.ndarray, mask: np.ndarray, edge_px: float) -> tuple[float, float]:
    """(phase NRMSE over the mask eroded by `edge_px`, share of the squared phase error in the edge band).

    The edge band is the mask's pixels within `edge_px` of its outside: pixels lit by the tails of the
    outermost positions' probes, whose high spatial frequencies reach the detector with few photons. The
    share uses the whole mask's offset (as phase_nrmse); the interior figure is phase_nrmse on its own
    pixels (own span, own offset). NaN when nothing is left inside.
    """
    inner = mask & (distance_transform_edt(mask) > edge_px)
    if not inner.any():
        return float("nan"), float("nan")
    d = _select(_phase(x), mask) - _select(_phase(ref), mask)
    e2 = _wrap(d - np.angle(np.mean(np.exp(1j * d)))) ** 2
    total = float(e2.sum())
    share = float(e2[~inner[mask]].sum() / total) if total > 0 else 0.0
    return phase_nrmse(x, ref, inner), share


def evaluate(recon: Reconstruction, scan: ScanData, threshold: float = 0.1, edge_px: float = 10.0) -> dict:
    """Compare a reconstruction with the scan's ground truth over the illuminated region.

    The truth is brought to the reconstruction's pixel (block averaging for integer ratios, Fourier cropping
    otherwise); the reconstruction is placed by its origin_m (sub-pixel remainders by a Fourier shift); both
    are cropped to their common area and compared inside the illuminated mask (scan.probe at the scan
    positions, `threshold` of the peak; the whole common area when the scan has no probe). SSIMs use the
    amplitude scaled by |c| of the complex fit and the phase with its global offset removed; the FRC is
    computed on the complex fields over the largest square inscribed in the compared region.
    `phase_nrmse_interior` and `edge_error_share` split the phase error at `edge_px` from the region's
    edge (edge_breakdown): where a reconstruction is limited by the scan's weakly lit rim, they say so.
    """
    if scan.object_truth is None:
        raise ValueError("evaluate needs a scan with object_truth (a simulated scan)")
    truth = np.asarray(scan.object_truth)
    dx_t = float(scan.metadata.get("object_pixel_m", scan.object_pixel_m))
    mask_t = (illuminated_mask(truth.shape, scan.probe, scan.positions_m / dx_t, threshold)
              if scan.probe is not None else np.ones(truth.shape, bool))
    ratio = recon.pixel_m / dx_t
    if abs(ratio - 1.0) < 1e-3:
        truth_g, mask_g, grid0, method, pix = truth, mask_t, 0.0, "none", dx_t
    else:
        truth_g, grid0, method = _resample(truth, ratio)
        mask_g = _resample(mask_t.astype(np.float64), ratio)[0] > 0.5
        pix = dx_t * truth.shape[0] / truth_g.shape[0] if method == "fourier" else dx_t * round(ratio)
    x = np.asarray(recon.object).astype(np.complex128)
    finite = np.isfinite(x)
    x = np.where(finite, x, 0)
    off = (np.asarray(recon.origin_m, dtype=np.float64) - grid0 * dx_t) / pix  # recon px (0,0) on the truth grid
    base = np.rint(off).astype(int)
    if np.abs(off - base).max() > 0.01:
        x = fourier_shift(x, off - base)
    r0, c0 = max(0, base[0]), max(0, base[1])
    r1 = min(truth_g.shape[0], base[0] + x.shape[0])
    c1 = min(truth_g.shape[1], base[1] + x.shape[1])
    if r1 <= r0 or c1 <= c0:
        raise ValueError("the reconstruction does not overlap the ground-truth object (check origin_m, pixel_m)")
    xs = x[r0 - base[0] : r1 - base[0], c0 - base[1] : c1 - base[1]]
    ts = truth_g[r0:r1, c0:c1]
    m = mask_g[r0:r1, c0:c1] & finite[r0 - base[0] : r1 - base[0], c0 - base[1] : c1 - base[1]]
    if not m.any():
        raise ValueError("no illuminated pixel lies inside the reconstruction")
    xv, tv = xs[m], ts[m]
    c = np.vdot(xv, tv) / max(np.vdot(xv, xv).real, 1e-300)
    amp_x, amp_t = np.abs(c * xs), np.abs(ts)
    ph_x = align_phase(xs, ts, m)
    sq = _inscribed_square(m)
    frc_m, crossed = (float("nan"), False)
    if sq is not None:
        f, crossed = frc_crossing(c * xs[sq], ts[sq])
        frc_m = pix / (2.0 * f)
    interior, edge_share = edge_breakdown(xs, ts, m, edge_px)
    return {
        "complex_nrmse": complex_nrmse(xs, ts, m),
        "phase_nrmse": phase_nrmse(xs, ts, m),
        "phase_nrmse_interior": interior,
        "edge_error_share": edge_share,
        "edge_px": float(edge_px),
        "amplitude_ssim": ssim(amp_x, amp_t, m),
        "phase_ssim": ssim(ph_x, np.angle(ts), m),
        "frc_half_pitch_m": frc_m,
        "frc_crossed": bool(crossed),
        "illuminated_fraction": float(m.sum() / max(mask_g.sum(), 1)),
        "n_pixels": int(m.sum()),
        "pixel_m": float(pix),
        "resampling": method,
    }
