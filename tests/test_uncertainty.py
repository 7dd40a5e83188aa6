"""Phase uncertainty: disagreement finds a bad patch, the residual and the rim raise σ, live = offline, fits."""

from __future__ import annotations

import numpy as np
import pytest

from edgeptycho.physics.forward import extract_patches
from edgeptycho.physics.probes import gaussian_probe
from edgeptycho.pipeline.stitcher import LiveStitcher, probe_weight, stitch
from edgeptycho.pipeline.uncertainty import (
    FEATURES,
    SIGMA2_COEFFS,
    SIGMA2_COEFFS_NO_RESID,
    calibration_curve,
    fit_sigma2,
    phase_sigma,
    sigma_from_features,
)

M = 32


def _patches(seed=0):
    rng = np.random.default_rng(seed)
    obj = (0.8 + 0.2 * rng.random((120, 120))) * np.exp(1j * rng.uniform(-1, 1, (120, 120)))
    g = np.arange(30, 91, 10, dtype=float)
    pos = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    p = extract_patches(obj.astype(np.complex64), pos, M, subpixel=False)
    w = probe_weight(gaussian_probe(M, 14.0)[None], M)
    return np.abs(p).astype(np.float32), np.angle(p).astype(np.float32), pos, w


def _box(pos, k, inset):
    r, c = (pos[k] - M // 2).astype(int)
    return slice(r + inset, r + M - inset), slice(c + inset, c + M - inset)


def test_consistent_patches_have_no_spread_and_a_disagreeing_one_shows_where_it_lies():
    amp, ph, pos, w = _patches()
    clean = stitch(amp, ph, pos, w, canvas_shape=(120, 120), method="none", subpixel=False)
    inside = clean.weight > 0.5 * clean.weight.max()
    assert np.nanmax(clean.features["dis2"][inside]) < 1e-6
    # σ of consistent patches is the fitted floor, never below it and larger on the sparsely covered rim
    floor = np.sqrt(SIGMA2_COEFFS_NO_RESID[FEATURES.index("one")])
    assert np.nanmin(clean.uncertainty[inside]) >= floor * 0.999
    rim = (clean.weight > 1e-3 * w.max()) & (clean.weight < 0.05 * clean.weight.max())
    if SIGMA2_COEFFS_NO_RESID[FEATURES.index("inv_cov")] > 0:
        assert np.nanmedian(clean.uncertainty[rim]) > np.nanmax(clean.uncertainty[inside])
    k = 24  # a patch in the middle of the grid predicts wrongly (phase noise 0.5 rad)
    bad = ph.copy()
    bad[k] += np.random.default_rng(1).normal(0, 0.5, (M, M)).astype(np.float32)
    res = stitch(amp, bad, pos, w, canvas_shape=(120, 120), method="none", subpixel=False)
    near = np.zeros_like(inside)
    near[_box(pos, k, 8)] = True
    far = inside.copy()
    far[_box(pos, k, -4)] = False
    assert np.nanmedian(res.features["dis2"][near]) > 0.01 and np.nanmax(res.features["dis2"][far]) < 1e-6
    assert np.nanmedian(res.uncertainty[near]) > np.nanmax(res.uncertainty[far])
    np.testing.assert_allclose(res.uncertainty[far], clean.uncertainty[far], rtol=1e-4)
    assert np.isnan(res.uncertainty[~(res.weight > 1e-3 * w.max())]).all()


def test_a_patch_with_a_high_residual_raises_sigma_where_it_lies_and_missing_residuals_fall_back():
    amp, ph, pos, w = _patches()
    k = 24
    r = np.full(len(pos), 0.01)
    r[k] = 0.1  # ten times the scan's median residual
    coeffs = (1.0, 0.01, 0.0, 0.0)  # σ² = dis² + 0.01·R/median(R): 0.1 rad at the median residual
    res = stitch(amp, ph, pos, w, canvas_shape=(120, 120), method="none", subpixel=False, residual=r)
    f = res.features
    sig = sigma_from_features(f, coeffs, (1.0, 0.0, 0.0, 0.0))
    near, inside = np.zeros(sig.shape, bool), res.weight > 0.5 * res.weight.max()
    near[_box(pos, k, 12)] = True
    far = inside.copy()
    far[_box(pos, k, -4)] = False
    np.testing.assert_allclose(sig[far], 0.1, rtol=1e-3)  # R = 1 away from the bad patch
    assert np.median(sig[near]) > 0.15
    # no residual known anywhere: the fallback coefficients (here the disagreement alone: 0)
    res0 = stitch(amp, ph, pos, w, canvas_shape=(120, 120), method="none", subpixel=False,
                  residual=np.full(len(pos), np.nan))
    assert np.isnan(res0.features["resid"]).all()
    assert np.nanmax(sigma_from_features(res0.features, coeffs, (1.0, 0.0, 0.0, 0.0))[inside]) < 1e-3
    with pytest.raises(ValueError, match="residual must be"):
        stitch(amp, ph, pos, w, residual=r[:-1])


def test_live_map_matches_the_offline_map_with_sampled_residuals_and_survives_a_paste():
    amp, ph, pos, w = _patches()
    ph = ph + np.random.default_rng(2).normal(0, 0.2, ph.shape).astype(np.float32)
    r = np.random.default_rng(3).uniform(0.01, 0.03, len(pos))
    r[1::3] = np.nan  # the live pipeline checks only some frames
    off = stitch(amp, ph, pos, w, canvas_shape=(120, 120), method="none", subpixel=False, residual=r)
    live = LiveStitcher((120, 120), M, w)
    for s in range(0, len(pos), 7):  # in batches, as the pipeline adds them
        live.add_batch(amp[s:s + 7], ph[s:s + 7], pos[s:s + 7], r[s:s + 7])
    sig = live.snapshot_sigma()
    inside = off.weight > 0.5 * off.weight.max()
    assert np.isfinite(sig[inside]).all()
    # the live stitcher aligns each patch's offset to the mosaic: the same spread up to that alignment
    np.testing.assert_allclose(sig[inside], off.uncertainty[inside], rtol=0.15, atol=0.02)
    box = (50, 70, 50, 70)
    values = np.full((20, 20), 0.5 * np.exp(0.3j), np.complex64)
    live.paste(box, values)
    snap = live.snapshot()
    got = snap[50:70, 50:70]
    np.testing.assert_allclose(np.abs(got), 0.5, rtol=1e-4)
    ang = np.angle(got * np.conj(values))  # pasted up to one global phase
    assert np.ptp(ang) < 1e-4
    np.testing.assert_allclose(live.snapshot_sigma()[50:70, 50:70], sig[50:70, 50:70], rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="residual must be"):
        live.add_batch(amp[:2], ph[:2], pos[:2], r[:3])


def test_phase_sigma_of_a_known_two_sample_spread():
    # two equal-weight predictions e^{±iθ}: mean cos θ, variance 1 − cos²θ → dis = tan θ
    th = 0.2
    num = np.array([[np.exp(1j * th) + np.exp(-1j * th)]])
    one = (1.0, 0.0, 0.0, 0.0)
    s = phase_sigma(num, np.array([[2.0]]), np.array([[2.0]]), 1.0, coeffs=one, coeffs_no_resid=one)
    assert s[0, 0] == pytest.approx(np.tan(th), rel=1e-5)
    assert len(SIGMA2_COEFFS) == len(FEATURES) and min(SIGMA2_COEFFS + SIGMA2_COEFFS_NO_RESID) >= 0


def test_nonnegative_fit_recovers_the_coefficients_and_the_curve_is_calibrated():
    rng = np.random.default_rng(0)
    n = 60_000
    f = {"dis2": rng.uniform(0, 0.1, n), "resid": rng.uniform(0.5, 3, n), "inv_cov": rng.uniform(0.1, 1, n),
         "one": np.ones(n)}
    true = (2.0, 0.01, 0.0, 0.005)
    s2 = sum(c * f[k] for k, c in zip(FEATURES, true, strict=True))
    err = rng.normal(0, np.sqrt(s2))
    c = fit_sigma2(f, err)
    assert c[0] == pytest.approx(2.0, rel=0.1) and c[1] == pytest.approx(0.01, rel=0.15)
    assert all(v >= 0 for v in c) and c[2] < 0.005
    assert fit_sigma2(f, err, ("dis2", "one"))[1] == 0.0  # features left out get 0
    cur = calibration_curve(sigma_from_features(f, c, c), err, bins=6)
    np.testing.assert_allclose(cur["rms_error"], cur["sigma"], rtol=0.1)
    assert sum(cur["count"]) == n
    with pytest.raises(ValueError, match="no pixel"):
        fit_sigma2({k: np.full(3, np.nan) for k in FEATURES}, np.ones(3))


def test_reconstruct_maps_every_frames_residual_into_the_uncertainty():
    from edgeptycho.commands.reconstruct import reconstruct_scan
    from edgeptycho.physics.simulate import preset, simulate

    scan = simulate(preset("small"), seed=11)
    keep: dict = {}
    recon, times = reconstruct_scan(scan, "tiny", batch=8, keep=keep)
    assert keep["residual"].shape == (scan.n_frames,) and np.isfinite(keep["residual"]).all()
    assert times["residual"] > 0 and "infer" in times
    res = keep["stitch"]
    inside = res.weight > 0.5 * res.weight.max()
    assert np.isfinite(res.features["resid"][inside]).all()
    assert np.median(res.features["resid"][inside]) == pytest.approx(1.0, rel=0.5)  # relative to the median
    np.testing.assert_array_equal(recon.uncertainty, res.uncertainty)
    assert np.isfinite(recon.uncertainty[inside]).all() and (recon.uncertainty[inside] > 0).all()
