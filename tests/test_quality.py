"""Label-free quality monitor: residual exactness, ranking of imperfect patches, flags, references, errors."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from scipy.stats import spearmanr

from edgeptycho.physics import simulate
from edgeptycho.physics.forward import diffraction_intensity, extract_patches
from edgeptycho.physics.probes import gaussian_probe, normalize_probe
from edgeptycho.pipeline.quality import ForwardResidual, QualityMonitor, poisson_floor


def _scan(dose):
    spec = simulate.preset("small").replace(scan={"n_positions": 64}, noise={"dose": dose})
    return simulate.simulate(spec, seed=11)


def _truth_patches(scan, m):
    dx = scan.metadata["object_pixel_m"]
    n = scan.frame_size
    o = n // 2 - m // 2
    return extract_patches(scan.object_truth, scan.positions_m / dx, n)[:, o:o + m, o:o + m]


def test_perfect_patch_has_zero_residual_on_the_exact_grid():
    n, m = 64, 32
    probe = normalize_probe(gaussian_probe(n, 6.0, curvature_px=10.0)[None], 1e4)  # fits inside 32 px
    rng = np.random.default_rng(0)
    obj = np.exp(1j * gaussian_filter(rng.standard_normal((120, 120)), 2) * 3).astype(np.complex64)
    pos = rng.uniform(40, 80, (8, 2))
    frames = diffraction_intensity(obj, probe, pos)
    o = n // 2 - m // 2
    patches = extract_patches(obj, pos, n)[:, o:o + m, o:o + m]
    fr = ForwardResidual(probe, m, grid=n, poisson=False)
    r = fr(frames, np.abs(patches), np.angle(patches))
    assert r.shape == (8,) and r.max() < 1e-4
    wrong = fr(frames, np.abs(patches), np.angle(patches) * 0.5)
    assert wrong.min() > 20 * r.max()


def test_residual_ranks_frames_by_their_true_patch_error():
    scan = _scan(1e6)
    m = 32
    truth = _truth_patches(scan, m)
    rng = np.random.default_rng(5)
    strength = rng.uniform(0, 1, len(truth))
    noise = gaussian_filter(rng.standard_normal((len(truth), 2, m, m)), (0, 0, 1.5, 1.5)) * 3
    pred = truth * (1 + 0.3 * strength[:, None, None] * noise[:, 0]) * np.exp(0.6j * strength[:, None, None]
                                                                             * noise[:, 1])
    o = scan.frame_size // 2 - m // 2
    w = (np.abs(scan.probe[:, o:o + m, o:o + m]) ** 2).sum(0)
    err = np.sqrt((w * np.abs(pred - truth) ** 2).sum((1, 2)) / (w * np.abs(truth) ** 2).sum((1, 2)))
    r = ForwardResidual(scan.probe, m)(scan.frames, np.abs(pred), np.angle(pred))
    assert spearmanr(r, err)[0] >= 0.8


def test_poisson_floor_matches_sampled_counts():
    rng = np.random.default_rng(0)
    for lam in (0.05, 0.5, 2.0, 50.0):
        x = rng.poisson(lam, 400_000)
        sampled = np.mean((np.sqrt(x) - np.sqrt(lam)) ** 2)
        assert abs(float(poisson_floor(np.array([lam]))[0]) - sampled) < 0.01


def test_monitor_flags_bad_frames_after_warmup_and_reports_status():
    scan = _scan(1e6)
    m = 32
    truth = _truth_patches(scan, m)
    mon = QualityMonitor(ForwardResidual(scan.probe, m), warmup=32)
    r0, f0 = mon.update(scan.frames[:40], np.abs(truth[:40]), np.angle(truth[:40]))
    assert not f0.any()  # nothing is flagged during the warm-up
    bad = np.angle(truth[40:]).copy()
    bad[::2] += np.random.default_rng(1).normal(0, 1.0, bad[::2].shape)  # every other frame is garbage
    r1, f1 = mon.update(scan.frames[40:], np.abs(truth[40:]), bad)
    assert f1[::2].all() and not f1[1::2].any()
    st = mon.status()
    assert st["frames"] == len(truth) and st["flagged"] == int(f1.sum()) and st["threshold"] > 0
    fixed = QualityMonitor(ForwardResidual(scan.probe, m), threshold=float(np.median(r0)))
    assert fixed.update(scan.frames[:40], np.abs(truth[:40]), np.angle(truth[:40]))[1].any()


def test_reference_regions_are_scored_and_calibrate_an_error_estimate():
    rng = np.random.default_rng(2)
    ref = np.exp(1j * gaussian_filter(rng.standard_normal((64, 64)), 2) * 5)
    mon = QualityMonitor(ForwardResidual(np.ones((1, 16, 16), np.complex64), 8))
    for s, res in ((0.05, 0.01), (0.1, 0.02), (0.2, 0.04)):
        rec = mon.add_reference(ref * np.exp(1j * s * rng.standard_normal(ref.shape)), ref,
                                residuals=np.full(10, res))
        assert rec.phase_nrmse > 0 and rec.median_residual == res
    lo, hi = mon.estimated_phase_nrmse(0.01), mon.estimated_phase_nrmse(0.04)
    assert lo < hi
    assert mon.status()["references"] == 3


def test_bad_shapes_name_the_problem():
    fr = ForwardResidual(np.ones((2, 64, 64), np.complex64), 32)
    with pytest.raises(ValueError, match="frames"):
        fr(np.ones((3, 32, 32)), np.ones((3, 32, 32)), np.ones((3, 32, 32)))
    with pytest.raises(ValueError, match="patches"):
        fr(np.ones((3, 64, 64)), np.ones((3, 16, 16)), np.ones((3, 16, 16)))
    with pytest.raises(ValueError, match="grid"):
        ForwardResidual(np.ones((1, 64, 64), np.complex64), 32, grid=48)
    with pytest.raises(ValueError, match="shape"):
        QualityMonitor(fr).add_reference(np.ones((4, 4)), np.ones((5, 5)))


def test_auto_grid_bins_more_when_counts_are_few():
    fr_low = ForwardResidual(np.ones((1, 128, 128), np.complex64), 64)
    fr_high = ForwardResidual(np.ones((1, 128, 128), np.complex64), 64)
    assert fr_low.choose_grid(1e4) < fr_high.choose_grid(1e6) == 128
    fr_low(np.full((2, 128, 128), 1e4 / 128**2, np.float32), np.ones((2, 64, 64)), np.zeros((2, 64, 64)))
    assert fr_low.g == fr_low.choose_grid(1e4) == 64 and 1e4 / fr_low.g**2 >= fr_low.min_counts


def test_the_residual_leaves_the_callers_frames_as_they_were():
    # float32 frames on the window's own grid are not binned: the square root must not land in them (the
    # quality stage keeps those frames for fallback refinement)
    scan = _scan(1e6)
    m = 16
    truth = _truth_patches(scan, m)
    fr = ForwardResidual(scan.probe, m, grid=2 * m)
    n = scan.frame_size
    frames = scan.frames.reshape(-1, 2 * m, n // (2 * m), 2 * m, n // (2 * m)).sum(axis=(2, 4)).astype(np.float32)
    fr32 = ForwardResidual(scan.probe[..., n // 2 - m:n // 2 + m, n // 2 - m:n // 2 + m], m, grid=2 * m)
    before = frames.copy()
    fr32(frames, np.abs(truth), np.angle(truth))
    np.testing.assert_array_equal(frames, before)
    raw = scan.frames.astype(np.float32)
    kept = raw.copy()
    fr(raw, np.abs(truth), np.angle(truth))
    np.testing.assert_array_equal(raw, kept)


def test_a_perfect_patch_fits_binned_frames_once_the_far_field_is_centred_on_the_binned_pixels():
    # a b×b-binned pixel is centred (b-1)/2 detector pixels off the FFT sample (forward.binning_ramp)
    n, m = 64, 16
    probe = normalize_probe(gaussian_probe(n, 4.0, curvature_px=8.0)[None], 1e6)
    rng = np.random.default_rng(3)
    obj = np.exp(1j * gaussian_filter(rng.standard_normal((120, 120)), 1.5) * 2).astype(np.complex64)
    pos = rng.uniform(40, 80, (8, 2))
    frames = diffraction_intensity(obj, probe, pos)
    patches = extract_patches(obj, pos, m)
    amp, ph = np.abs(patches), np.angle(patches)
    on_binned_grid = ForwardResidual(probe, m, grid=n // 4, poisson=False)(frames, amp, ph)
    e = 2 * m  # frames the caller binned to the window already, as the quality stage keeps them
    pre = frames.reshape(8, e, n // e, e, n // e).sum(axis=(2, 4)).astype(np.float32)
    o = n // 2 - e // 2
    prebinned = ForwardResidual(probe[:, o:o + e, o:o + e], m, grid=e, poisson=False, prebinned=n // e)(pre, amp, ph)
    assert on_binned_grid.max() < 2e-3 and prebinned.max() < 2e-3, (on_binned_grid, prebinned)
