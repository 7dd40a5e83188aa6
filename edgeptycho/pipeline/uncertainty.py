"""Per-pixel phase uncertainty from label-free stitch features: overlap disagreement, residual map, coverage.

Every object pixel is predicted by each patch covering it (at 70 % overlap, several predictions from
different diffraction patterns). With blending weights w (probe intensity) the stitchers keep Σw, Σw·z
(after each patch's phase offset), Σw·|z|² and, for patches whose data-consistency residual r is known
(pipeline.quality.ForwardResidual), Σw·r and Σw over those patches. Per pixel that gives the features

    dis² = (Σw|z|²/Σw − |Σwz/Σw|²) / |Σwz/Σw|²    overlap disagreement (rad², small-angle)
    R    = Σw·r / Σw_r / median(r)                probe-weighted residual of the covering patches,
                                                  relative to the scan's median patch residual
    1/cov = w_peak / Σw                           few covering patches (the scan's rim) → large
    1                                             the error every patch shares (CNN bias, drift)

and the published σ² is a nonnegative combination of them, the coefficients fitted on simulated scans
against the true phase error (benchmarks/bench_uncertainty.py; figures in docs/refinement.md). A pixel no
patch with a known residual covers (the live pipeline checks one frame in `quality.every`) uses the
coefficients fitted without R. Pixels outside the scan get NaN.
"""

from __future__ import annotations

import numpy as np

FEATURES = ("dis2", "resid", "inv_cov", "one")
# σ² = Σ coefficient·feature (FEATURES order). Nonnegative least squares of the squared true phase error
# on the calibration seeds 101-102 of the 4 preset kinds, shipped `default` model, produced (and printed as
# its last two lines) by
#     nice -n 10 python benchmarks/bench_uncertainty.py --json --every 5
# Refitted for cpu-default 0.2.0 (docs/refinement.md): the fit with R printed (0.36383, 0.02206, 0.0, 0.0),
# but on the test seeds it ranked worse (pooled Spearman 0.365 vs 0.420) and over-predicted the RMS error
# (0.181 vs 0.150 rad) where the fit without R matched it (0.149), so the fit without R is shipped for both:
# R's weight is 0 and reconstruct skips the residual it would cost (0.65× the inference time).
SIGMA2_COEFFS = (0.6158, 0.0, 0.00696, 0.01038)
SIGMA2_COEFFS_NO_RESID = (0.6158, 0.0, 0.00696, 0.01038)


def residual_used(coeffs: tuple[float, ...] = SIGMA2_COEFFS) -> bool:
    """Whether the map gives the per-patch residual any weight (else computing it buys nothing)."""
    return coeffs[FEATURES.index("resid")] > 0
# below this fraction of one patch's peak weight a pixel is outside the scan (as stitcher.MIN_WEIGHT_FRACTION)
MIN_WEIGHT_FRACTION = 1e-3


def features(num: np.ndarray, den: np.ndarray, sq: np.ndarray, peak_weight: float,
             rnum: np.ndarray | None = None, rden: np.ndarray | None = None,
             resid_ref: float | None = None) -> dict[str, np.ndarray]:
    """Feature maps (float32, FEATURES names) from the running sums; NaN outside the scan, resid NaN unknown.

    num = Σw·z, den = Σw, sq = Σw·|z|², rnum = Σw·r and rden = Σw over patches with a residual (optional),
    `resid_ref` the scan's median patch residual (the residual's level differs between objects far more
    than their error does: relative to the median it ranks pixels across kinds, absolute it did not).
    `peak_weight`: one patch's maximum weight; less summed weight than MIN_WEIGHT_FRACTION of it is outside.
    """
    num, den, sq = np.asarray(num), np.asarray(den, np.float32), np.asarray(sq, np.float32)
    nan = np.float32(np.nan)
    # NaN outside the scan carried through whole-array arithmetic: boolean indexing (gathers and scatters)
    # cost 3x more on the live mosaic's refresh, at every display frame.
    d = np.where(den > MIN_WEIGHT_FRACTION * peak_weight, den, nan)
    out: dict[str, np.ndarray] = {}
    with np.errstate(invalid="ignore"):
        mean2 = num.real * num.real
        mean2 += num.imag * num.imag
        mean2 /= d * d
        dis2 = sq / d
        dis2 -= mean2
        np.maximum(dis2, 0.0, out=dis2)
        dis2 /= np.maximum(mean2, 1e-12)
        out["dis2"] = dis2
        out["resid"] = np.full(den.shape, nan)
        out["inv_cov"] = peak_weight / d
        out["one"] = np.where(np.isnan(d), nan, np.float32(1.0))
        if rnum is not None and rden is not None and resid_ref is not None and resid_ref > 0:
            rd = np.asarray(rden, np.float32)
            rd = np.where(rd > MIN_WEIGHT_FRACTION * peak_weight, rd, nan)
            resid = np.asarray(rnum, np.float32) / (rd * np.float32(resid_ref))
            out["resid"] = np.where(np.isnan(d), nan, resid)  # outside the scan even where a residual landed
    return {k: out[k] for k in FEATURES}


def sigma_from_features(f: dict[str, np.ndarray], coeffs=SIGMA2_COEFFS,
                        coeffs_no_resid=SIGMA2_COEFFS_NO_RESID) -> np.ndarray:
    """σ (rad, float32) = √(Σ c·feature); `coeffs_no_resid` where the residual map is unknown."""
    s2 = np.zeros(f["one"].shape, np.float32)
    for k, c in zip(FEATURES, coeffs, strict=True):
        if k != "resid":
            s2 += np.float32(c) * f[k]
    c_r = coeffs[FEATURES.index("resid")]
    if c_r or tuple(coeffs_no_resid) != tuple(coeffs):  # else the residual changes nothing (shipped fit)
        s2_nr = np.zeros_like(s2)
        for k, c0 in zip(FEATURES, coeffs_no_resid, strict=True):
            if k != "resid":
                s2_nr += np.float32(c0) * f[k]
        r = f["resid"]
        known = np.isfinite(r)
        s2 = np.where(known, s2 + np.float32(c_r) * np.maximum(r, 0.0), s2_nr)
    return np.sqrt(np.maximum(s2, 0.0))  # NaN stays NaN outside the scan


def phase_sigma(num: np.ndarray, den: np.ndarray, sq: np.ndarray, peak_weight: float,
                rnum: np.ndarray | None = None, rden: np.ndarray | None = None, resid_ref: float | None = None,
                coeffs=SIGMA2_COEFFS, coeffs_no_resid=SIGMA2_COEFFS_NO_RESID) -> np.ndarray:
    """σ_φ (rad, float32) from the running sums (see `features`); NaN where undefined."""
    if not residual_used(coeffs) and tuple(coeffs) == tuple(coeffs_no_resid):
        rnum = rden = None  # the residual term has no weight: its map is not worth computing
    return sigma_from_features(features(num, den, sq, peak_weight, rnum, rden, resid_ref), coeffs,
                               coeffs_no_resid)


def fit_sigma2(f: dict[str, np.ndarray], error: np.ndarray, use: tuple[str, ...] = FEATURES) -> tuple[float, ...]:
    """Nonnegative coefficients (FEATURES order; 0 for features not in `use`) of E[error²] ≈ Σ c·feature.

    `f`: 1-D feature arrays over the same pixels as `error`; pixels with a non-finite used feature are left
    out. Least squares on the squared error estimates its conditional mean, which is what σ² should be.
    """
    from scipy.optimize import nnls

    e = np.asarray(error, np.float64).ravel()
    X = np.stack([np.asarray(f[k], np.float64).ravel() for k in use], 1)
    ok = np.isfinite(X).all(1) & np.isfinite(e)
    if not ok.any():
        raise ValueError("no pixel with finite features to fit on")
    X, y = X[ok], e[ok] ** 2
    norm = np.maximum(np.sqrt((X ** 2).mean(0)), 1e-30)  # equalise columns: NNLS is scale-sensitive
    c, _ = nnls(X / norm, y)
    c = c / norm
    return tuple(float(c[use.index(k)]) if k in use else 0.0 for k in FEATURES)


def calibration_curve(sigma: np.ndarray, error: np.ndarray, bins: int = 12) -> dict[str, list[float]]:
    """Quantile bins of predicted σ: mean σ, RMS true error and pixel count per bin (finite pixels only)."""
    s, e = np.asarray(sigma, np.float64).ravel(), np.asarray(error, np.float64).ravel()
    ok = np.isfinite(s) & np.isfinite(e)
    s, e = s[ok], e[ok]
    if s.size == 0:
        return {"sigma": [], "rms_error": [], "count": []}
    edges = np.unique(np.quantile(s, np.linspace(0, 1, bins + 1)))
    idx = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, len(edges) - 2)
    out: dict[str, list[float]] = {"sigma": [], "rms_error": [], "count": []}
    for b in range(len(edges) - 1):
        k = idx == b
        if k.any():
            out["sigma"].append(float(s[k].mean()))
            out["rms_error"].append(float(np.sqrt((e[k] ** 2).mean())))
            out["count"].append(int(k.sum()))
    return out
