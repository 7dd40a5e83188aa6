"""Metrics: invariances, an independent phase-NRMSE, FRC band limit, illuminated mask, evaluate()."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft as sfft

from edgeptycho.physics import metrics
from edgeptycho.physics.objects import make_object
from edgeptycho.physics.simulate import preset, simulate
from edgeptycho.physics.types import Reconstruction


@pytest.fixture(scope="module")
def obj():
    return make_object("texture", (64, 64), seed=3, phase_range=2.0)


def test_metrics_zero_on_identical_and_invariant_to_global_phase_and_scale(obj):
    mask = np.zeros(obj.shape, bool)
    mask[8:56, 4:60] = True
    assert metrics.complex_nrmse(obj, obj, mask) == pytest.approx(0.0, abs=1e-6)
    assert metrics.phase_nrmse(obj, obj, mask) == pytest.approx(0.0, abs=1e-6)
    # a global phase of 3 rad wraps many pixels across ±π: the metrics must not care
    changed = 0.37 * np.exp(3.0j) * obj
    assert metrics.complex_nrmse(changed, obj, mask) == pytest.approx(0.0, abs=1e-6)
    assert metrics.phase_nrmse(changed, obj, mask) == pytest.approx(0.0, abs=1e-6)
    assert metrics.ssim(np.abs(obj), np.abs(obj), mask) == pytest.approx(1.0)
    assert metrics.ssim(metrics.align_phase(changed, obj, mask), np.angle(obj), mask) == pytest.approx(1.0)
    noisy = obj + 0.05 * np.random.default_rng(0).normal(size=obj.shape)
    assert 0.01 < metrics.complex_nrmse(noisy, obj, mask) < 0.2
    assert metrics.ssim(np.abs(noisy), np.abs(obj), mask) < 0.99


def test_complex_nrmse_closed_form_is_the_minimum(obj):
    x = obj + 0.1 * np.random.default_rng(1).normal(size=obj.shape)
    best = metrics.complex_nrmse(x, obj)
    for c in (1.0, 1.05, 0.95 * np.exp(0.05j)):
        assert best <= np.linalg.norm(c * x - obj) / np.linalg.norm(obj) + 1e-12


def test_phase_nrmse_matches_straightforward_computation(obj):
    rng = np.random.default_rng(2)
    mask = rng.random(obj.shape) > 0.3
    phase_err = 0.3 * rng.normal(size=obj.shape)
    x = np.abs(obj) * np.exp(1j * (np.angle(obj) + 1.1 + phase_err))
    # independent: per-pixel loop, atan2 circular mean, wrap through exp/angle
    d = [np.angle(x[i, j]) - np.angle(obj[i, j]) for i, j in zip(*np.nonzero(mask), strict=True)]
    offset = np.arctan2(np.sum(np.sin(d)), np.sum(np.cos(d)))
    rms = np.sqrt(np.mean([np.angle(np.exp(1j * (v - offset))) ** 2 for v in d]))
    ref = np.angle(obj)[mask]
    assert metrics.phase_nrmse(x, obj, mask) == pytest.approx(rms / (ref.max() - ref.min()), rel=1e-9)
    # real inputs are phase maps
    assert metrics.phase_nrmse(np.angle(x), np.angle(obj), mask) == pytest.approx(
        metrics.phase_nrmse(x, obj, mask), rel=1e-9)


def _band_split(n, cutoff, seed):
    k = np.hypot(*np.meshgrid(sfft.fftfreq(n) * n, sfft.fftfreq(n) * n, indexing="ij"))
    rng = np.random.default_rng(seed)
    white = sfft.fft2(rng.normal(size=(n, n)))
    return np.real(sfft.ifft2(white * (k < cutoff))), np.real(sfft.ifft2(white * (k >= cutoff)))


@pytest.mark.parametrize("cutoff", [20, 45, 80])
def test_frc_finds_a_known_band_limit_within_one_ring(cutoff):
    n = 256
    shared, _ = _band_split(n, cutoff, 0)
    _, noise_a = _band_split(n, cutoff, 1)
    _, noise_b = _band_split(n, cutoff, 2)
    f, crossed = metrics.frc_crossing(shared + noise_a, shared + noise_b)
    assert crossed and abs(f * n - cutoff) <= 1.0
    half_pitch = metrics.frc_resolution(shared + noise_a, shared + noise_b, pixel_m=10e-9)
    assert half_pitch == pytest.approx(10e-9 * n / (2 * cutoff), rel=0.06)
    res = metrics.frc(shared + noise_a, shared + noise_b)
    assert res.threshold[-1] < 0.25 and np.all(res.frc[2 : cutoff - 3] > 0.9)


def test_frc_never_crossing_reports_nyquist_and_flag(obj):
    assert metrics.frc_crossing(obj, obj) == (0.5, False)
    assert metrics.frc_resolution(obj, obj, 10e-9) == pytest.approx(10e-9)


def test_illuminated_mask_toy_case():
    n = 32
    yy, xx = np.mgrid[0:n, 0:n]
    probe = (np.hypot(yy - n // 2, xx - n // 2) <= 5).astype(np.complex64)
    probe[n // 2, n // 2] = 3.0  # peak 9 in intensity: the disc (1) passes a 0.1 threshold, not 0.2
    mask = metrics.illuminated_mask((50, 60), probe, np.array([[20.2, 30.6], [45.0, 58.0]]))
    y, x = np.mgrid[0:50, 0:60]
    expected = (np.hypot(y - 20, x - 31) <= 5) | (np.hypot(y - 45, x - 58) <= 5)  # rounded, clipped at edges
    np.testing.assert_array_equal(mask, expected)
    only_peak = metrics.illuminated_mask((50, 60), probe, np.array([[20.0, 30.0]]), threshold=0.2)
    assert only_peak.sum() == 1 and only_peak[20, 30]


@pytest.fixture(scope="module")
def scan():
    return simulate(preset("small"), seed=0)


def test_evaluate_perfect_offset_and_binned_reconstructions(scan):
    truth, dx = scan.object_truth, scan.object_pixel_m
    perfect = metrics.evaluate(Reconstruction(truth * 1.7j, dx, scan.positions_m), scan)
    assert perfect["complex_nrmse"] < 1e-6 and perfect["phase_nrmse"] < 1e-6
    assert perfect["amplitude_ssim"] > 0.9999 and perfect["illuminated_fraction"] == 1.0
    assert perfect["frc_half_pitch_m"] == pytest.approx(dx) and perfect["resampling"] == "none"
    crop = Reconstruction(truth[30:90, 12:100], dx, scan.positions_m, origin_m=(30 * dx, 12 * dx))
    placed = metrics.evaluate(crop, scan)
    assert placed["complex_nrmse"] < 1e-6 and placed["illuminated_fraction"] < 1.0
    misplaced = metrics.evaluate(Reconstruction(truth[30:90, 12:100], dx, scan.positions_m), scan)
    assert misplaced["complex_nrmse"] > 0.1
    h = truth.shape[0] // 2 * 2
    binned = truth[:h, :h].reshape(h // 2, 2, h // 2, 2).mean(axis=(1, 3))
    coarse = metrics.evaluate(Reconstruction(binned, 2 * dx, scan.positions_m, origin_m=(dx / 2, dx / 2)), scan)
    assert coarse["resampling"] == "block-average" and coarse["complex_nrmse"] < 1e-6
    resampled, _, method = metrics._resample(truth, 1.5)
    fine = metrics.evaluate(Reconstruction(resampled, 1.5 * dx, scan.positions_m), scan)
    assert method == "fourier" and fine["resampling"] == "fourier" and fine["complex_nrmse"] < 1e-6


def test_edge_breakdown_separates_the_rim_from_the_interior(scan):
    """Errors confined to the outer band of the illuminated region: the interior scores 0, the band all of it."""
    from scipy.ndimage import distance_transform_edt

    truth, dx = scan.object_truth, scan.object_pixel_m
    mask = metrics.illuminated_mask(truth.shape, scan.probe, scan.positions_m / dx)
    band = mask & (distance_transform_edt(mask) <= 4)
    noisy = truth * np.exp(1j * np.where(band, np.random.default_rng(0).normal(0, 0.5, truth.shape), 0))
    res = metrics.evaluate(Reconstruction(noisy, dx, scan.positions_m), scan, edge_px=4)
    assert res["phase_nrmse"] > 0.02
    assert res["phase_nrmse_interior"] < 1e-6 and res["edge_error_share"] > 0.999  # (the whole-mask offset)
    inside = metrics.evaluate(Reconstruction(noisy, dx, scan.positions_m), scan, edge_px=1)
    assert inside["phase_nrmse_interior"] > 0.02 and inside["edge_error_share"] < 1.0  # band wider than 1 px


def test_evaluate_needs_ground_truth(scan):
    from dataclasses import replace
    with pytest.raises(ValueError, match="object_truth"):
        metrics.evaluate(Reconstruction(scan.object_truth, scan.object_pixel_m, scan.positions_m),
                         replace(scan, object_truth=None))
