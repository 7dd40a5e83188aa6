"""Fit and check the phase-uncertainty model against true error on simulated scans; print its constants.

    nice -n 10 python benchmarks/bench_uncertainty.py [--kinds siemens-star ic cells texture]
        [--calib-seeds 101 102] [--test-seeds 201 202] [--model default] [--png out/uncertainty.png] [--json]
        [--every 5]

For every preset kind and seed: `simulate` (preset, seed) → commands.reconstruct_scan (CNN inference, the
ForwardResidual of every frame, stitch, which keeps the uncertainty's feature maps) → true phase error =
wrapped phase of object·conj(truth), global phase removed (and, unless --no-detrend, the best-fit phase
plane: a ramp is ptychography's own ambiguity), on the illuminated pixels. The nonnegative coefficients of
σ² = Σ c·feature (pipeline.uncertainty.FEATURES) are fitted on the calibration seeds, with the residual and
without it (the live pipeline checks only some frames), and reported on the test seeds beside the old
disagreement-only map (σ = a·dis): Spearman(σ, |error|) per kind and pooled, the calibration curve
(quantile bins of σ: mean σ vs RMS true error, drawn to the PNG). The last two lines printed (to stderr
with --json, whose stdout is one JSON document) are the constants to paste into pipeline/uncertainty.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from scipy.stats import spearmanr

from edgeptycho.commands.reconstruct import reconstruct_scan
from edgeptycho.physics.metrics import illuminated_mask
from edgeptycho.physics.simulate import preset, simulate
from edgeptycho.pipeline.uncertainty import (
    FEATURES,
    SIGMA2_COEFFS,
    SIGMA2_COEFFS_NO_RESID,
    calibration_curve,
    fit_sigma2,
    sigma_from_features,
)

SAMPLE = 200_000  # pixels drawn for Spearman (ranks of millions of pixels add nothing but time)


def pixels(kind: str, seed: int, model: str, detrend: bool = True,
           every: int = 1) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(feature arrays, true phase error) over the illuminated pixels of one simulated scan."""
    scan = simulate(preset(kind), seed=seed)
    keep: dict = {}
    recon, _ = reconstruct_scan(scan, model, threads=1, keep=keep, residual_every=every)
    feats = keep["stitch"].features
    dx = scan.object_pixel_m
    r0, c0 = (int(round(v / dx)) for v in recon.origin_m)
    h, w = recon.object.shape
    truth = np.ones((h, w), np.complex64)  # canvas pixels past the truth's edge: excluded by the mask below
    th, tw = scan.object_truth.shape
    rs, cs = max(r0, 0), max(c0, 0)
    re, ce = min(r0 + h, th), min(c0 + w, tw)
    truth[rs - r0:re - r0, cs - c0:ce - c0] = scan.object_truth[rs:re, cs:ce]
    inside = np.zeros((h, w), bool)
    inside[rs - r0:re - r0, cs - c0:ce - c0] = True
    lit = illuminated_mask((h, w), scan.probe, scan.positions_px() - np.array([r0, c0]), threshold=0.5)
    mask = inside & lit & np.isfinite(feats["dis2"]) & (np.abs(recon.object) > 0)
    z = recon.object * np.conj(truth)
    z *= np.exp(-1j * np.angle(z[mask].sum()))
    err = np.angle(z[mask])
    if detrend:  # a linear phase ramp is ptychography's own ambiguity: judge the map on what is left
        rr, cc = np.nonzero(mask)
        A = np.stack([np.ones(len(rr)), rr, cc], 1).astype(np.float64)
        err = np.angle(np.exp(1j * (err - A @ np.linalg.lstsq(A, err, rcond=None)[0])))
    return {k: v[mask] for k, v in feats.items()}, err


def spearman(s: np.ndarray, e: np.ndarray, rng: np.random.Generator) -> float:
    k = rng.choice(len(s), min(SAMPLE, len(s)), replace=False)
    return float(spearmanr(s[k], np.abs(e[k])).statistic)


def _cat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in FEATURES}


def score(name: str, sig: dict, err: dict, kinds: list[str], rng: np.random.Generator) -> dict:
    """Spearman per kind and pooled, RMS σ and error, and the pooled calibration curve of one σ model."""
    out: dict = {"per_kind": {}}
    for k in kinds:
        out["per_kind"][k] = {"spearman": spearman(sig[k], err[k], rng), "rms_sigma": float(np.sqrt((sig[k] ** 2).mean())),
                              "rms_error": float(np.sqrt((err[k] ** 2).mean())), "pixels": int(len(sig[k]))}
    s, e = np.concatenate([sig[k] for k in kinds]), np.concatenate([err[k] for k in kinds])
    out["pooled"] = {"spearman": spearman(s, e, rng), "rms_sigma": float(np.sqrt((s ** 2).mean())),
                     "rms_error": float(np.sqrt((e ** 2).mean())), "pixels": int(len(s))}
    out["calibration_curve"] = calibration_curve(s, e, bins=12)
    return out


def plot(path: str, kinds: list[str], sig: dict, err: dict, base: dict, coeffs: tuple) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from pathlib import Path

    import matplotlib.pyplot as plt

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    for k in kinds:
        c = calibration_curve(sig[k], err[k], bins=8)
        ax.plot(c["sigma"], c["rms_error"], "o-", ms=3, label=k)
    s, e = np.concatenate([sig[k] for k in kinds]), np.concatenate([err[k] for k in kinds])
    curve = calibration_curve(s, e, bins=12)
    ax.plot(curve["sigma"], curve["rms_error"], "k-", lw=2, label="pooled")
    b = calibration_curve(np.concatenate([base[k] for k in kinds]), e, bins=12)
    ax.plot(b["sigma"], b["rms_error"], "k--", lw=1, label="pooled, a·dis only")
    hi = max(max(curve["sigma"]), max(curve["rms_error"]), max(b["sigma"]))
    ax.plot([0, hi], [0, hi], "k:", lw=1, label="ideal")
    ax.set_xlabel("predicted σ (rad), bin mean")
    ax.set_ylabel("RMS true phase error (rad)")
    ax.set_title("σ² = " + " + ".join(f"{c:.3g}·{f}" for f, c in zip(FEATURES, coeffs, strict=True) if c), fontsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", nargs="+", default=["siemens-star", "ic", "cells", "texture"])
    ap.add_argument("--calib-seeds", nargs="+", type=int, default=[101, 102])
    ap.add_argument("--test-seeds", nargs="+", type=int, default=[201, 202])
    ap.add_argument("--model", default="default")
    ap.add_argument("--png", default="out/uncertainty_calibration.png")
    ap.add_argument("--no-detrend", action="store_true", help="keep the best-fit phase plane in the true error")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON document")
    ap.add_argument("--every", type=int, default=0, help="also score the test seeds with the residual of one "
                    "frame in N only, as the live pipeline's quality.every (the coefficients just fitted)")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    data = {(k, s): pixels(k, s, args.model, not args.no_detrend)
            for k in args.kinds for s in args.calib_seeds + args.test_seeds}
    cal_f = _cat([data[k, s][0] for k in args.kinds for s in args.calib_seeds])
    cal_e = np.concatenate([data[k, s][1] for k in args.kinds for s in args.calib_seeds])
    full = fit_sigma2(cal_f, cal_e)
    no_resid = fit_sigma2(cal_f, cal_e, tuple(f for f in FEATURES if f != "resid"))
    base = fit_sigma2(cal_f, cal_e, ("dis2",))  # the previous map: σ = a·dis
    test = {k: (_cat([data[k, t][0] for t in args.test_seeds]),
                np.concatenate([data[k, t][1] for t in args.test_seeds])) for k in args.kinds}
    err = {k: test[k][1] for k in args.kinds}
    sig = {k: sigma_from_features(test[k][0], full, no_resid) for k in args.kinds}
    nr = {k: test[k][0] | {"resid": np.full_like(test[k][0]["resid"], np.nan)} for k in args.kinds}
    sig_nr = {k: sigma_from_features(nr[k], full, no_resid) for k in args.kinds}
    sig_base = {k: sigma_from_features(nr[k], base, base) for k in args.kinds}
    out: dict = {"model": args.model, "detrend": not args.no_detrend, "features": FEATURES,
                 "coeffs": full, "coeffs_no_resid": no_resid, "scale_dis_only": float(np.sqrt(base[0])),
                 "shipped": {"coeffs": SIGMA2_COEFFS, "coeffs_no_resid": SIGMA2_COEFFS_NO_RESID},
                 "calib_seeds": args.calib_seeds, "test_seeds": args.test_seeds,
                 "full": score("full", sig, err, args.kinds, rng),
                 "no_resid": score("no_resid", sig_nr, err, args.kinds, rng),
                 "dis_only": score("dis_only", sig_base, err, args.kinds, rng)}
    if args.every > 1:  # the live pipeline: R from a sample of the frames, the rest on the fallback
        sampled = {k: [pixels(k, t, args.model, not args.no_detrend, args.every) for t in args.test_seeds]
                   for k in args.kinds}
        sig_s = {k: sigma_from_features(_cat([p[0] for p in v]), full, no_resid) for k, v in sampled.items()}
        err_s = {k: np.concatenate([p[1] for p in v]) for k, v in sampled.items()}
        out[f"every_{args.every}"] = score("sampled", sig_s, err_s, args.kinds, rng)
        out[f"every_{args.every}"]["resid_known"] = float(np.mean(np.concatenate(
            [np.isfinite(_cat([p[0] for p in v])["resid"]) for v in sampled.values()])))
    out["seconds"] = time.perf_counter() - t0
    if args.png:
        plot(args.png, args.kinds, sig, err, sig_base, full)
        out["png"] = args.png
    if args.json:
        json.dump(out, sys.stdout, indent=1)
        print()
    else:
        for name in ("dis_only", "no_resid", "full", f"every_{args.every}"):
            if name not in out:
                continue
            o = out[name]
            print(f"{name:<9s} pooled Spearman {o['pooled']['spearman']:.3f}  "
                  + "  ".join(f"{k} {v['spearman']:.3f}" for k, v in o["per_kind"].items()))
    lines = (f"SIGMA2_COEFFS = {tuple(round(c, 5) for c in full)}\n"
             f"SIGMA2_COEFFS_NO_RESID = {tuple(round(c, 5) for c in no_resid)}")
    print(lines, file=sys.stderr if args.json else sys.stdout)  # --json: stdout stays one JSON document
    return 0


if __name__ == "__main__":
    sys.exit(main())
