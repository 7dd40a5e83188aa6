"""Hybrid refinement: seeded and flat runs, region refinement, seeds with holes, the Dask tier."""

from __future__ import annotations

import numpy as np
import pytest

from edgeptycho.physics import metrics, simulate
from edgeptycho.physics.types import Reconstruction
from edgeptycho.pipeline.refine import refine, refine_tiled


@pytest.fixture(scope="module")
def scan():
    return simulate.simulate(simulate.preset("small").replace(noise={"dose": None}), seed=4)


@pytest.fixture(scope="module")
def seed(scan):
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(scan.object_truth.shape)
    obj = (scan.object_truth * np.exp(0.4j * noise)).astype(np.complex64)
    return Reconstruction(obj, scan.object_pixel_m, scan.positions_m)


def test_ten_iterations_from_a_seed_beat_the_seed(scan, seed):
    before = metrics.evaluate(seed, scan)["phase_nrmse"]
    rec = refine(scan, seed, n_iters=10)
    after = metrics.evaluate(rec, scan)["phase_nrmse"]
    assert after < 0.5 * before
    assert rec.convergence.shape == (10,) and rec.convergence[-1] < rec.convergence[0]
    assert rec.pixel_m == scan.object_pixel_m and rec.probe.shape == scan.probe.shape
    assert rec.positions_m.shape == scan.positions_m.shape


@pytest.mark.parametrize("whole", [True, False])
def test_progress_callback_sees_every_sweep_with_its_misfit(scan, seed, whole):
    dx = scan.object_pixel_m
    calls = []
    rec = refine(scan, seed, n_iters=4, region=None if whole else (40 * dx, 70 * dx, 45 * dx, 80 * dx),
                 callback=lambda it, misfit: calls.append((it, misfit)))
    assert [it for it, _ in calls] == [0, 1, 2, 3]
    np.testing.assert_allclose([m for _, m in calls], rec.convergence)


def test_flat_start_uses_the_truth_grid_and_converges(scan):
    rec = refine(scan, None, n_iters=30, batch_size=4)
    assert rec.object.shape == scan.object_truth.shape and rec.origin_m == (0.0, 0.0)
    assert metrics.evaluate(rec, scan)["phase_nrmse"] < 0.03


def test_region_refinement_changes_only_the_region(scan, seed):
    dx = scan.object_pixel_m
    region = (40 * dx, 70 * dx, 45 * dx, 80 * dx)
    rec = refine(scan, seed, n_iters=5, region=region)
    changed = np.abs(rec.object - seed.object) > 1e-6
    rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
    assert rows.min() >= 40 and rows.max() < 70 and cols.min() >= 45 and cols.max() < 80
    assert changed[40:70, 45:80].mean() > 0.9
    m = np.zeros(seed.object.shape, bool)
    m[40:70, 45:80] = True
    assert (metrics.phase_nrmse(rec.object, scan.object_truth, m)
            < metrics.phase_nrmse(seed.object, scan.object_truth, m))


def test_seed_holes_are_filled_grid_is_padded_and_seed_untouched(scan, seed):
    obj = seed.object.copy()
    obj[:10] = np.nan  # a stitched mosaic leaves unvisited pixels empty
    small = Reconstruction(obj[5:-5, 5:-5].copy(), seed.pixel_m, seed.positions_m,
                           origin_m=(5 * seed.pixel_m, 5 * seed.pixel_m))
    keep = small.object.copy()
    rec = refine(scan, small, n_iters=2)
    assert np.isfinite(rec.object).all()
    assert rec.object.shape[0] >= small.object.shape[0] and rec.origin_m[0] <= small.origin_m[0]
    np.testing.assert_array_equal(small.object, keep)
    assert np.isfinite(metrics.evaluate(rec, scan)["phase_nrmse"])


def test_bad_seed_pixel_and_probe_names_are_rejected(scan, seed):
    wrong = Reconstruction(seed.object, 2 * seed.pixel_m, seed.positions_m)
    with pytest.raises(ValueError, match="pixel"):
        refine(scan, wrong, n_iters=1)
    with pytest.raises(ValueError, match="probe_init"):
        refine(scan, seed, probe_init="guess", n_iters=1)
    assert refine(scan, seed, probe_init="estimate", n_iters=1).probe.shape[-1] == scan.frame_size


def test_tiled_refinement_on_dask_matches_the_whole_scan_refinement(scan, seed):
    distributed = pytest.importorskip("distributed")
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as client:
        tiled = refine_tiled(scan, seed, n_iters=10, tile_px=48, client=client, probe_update_start=None)
    whole = refine(scan, seed, n_iters=10, probe_update_start=None)
    q_t, q_w = metrics.evaluate(tiled, scan)["phase_nrmse"], metrics.evaluate(whole, scan)["phase_nrmse"]
    assert q_t < 1.5 * q_w and q_t < 0.5 * metrics.evaluate(seed, scan)["phase_nrmse"]
    assert tiled.object.shape == whole.object.shape


@pytest.mark.slow
def test_tiled_refinement_on_a_local_process_cluster(scan, seed):
    pytest.importorskip("distributed")
    rec = refine_tiled(scan, seed, n_iters=3, tile_px=64, n_workers=2, probe_update_start=None)
    assert metrics.evaluate(rec, scan)["phase_nrmse"] < metrics.evaluate(seed, scan)["phase_nrmse"]
