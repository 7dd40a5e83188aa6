"""mPIE momentum, the Poisson correction, step annealing: faster convergence, lower noise floor, one code path."""

from __future__ import annotations

import numpy as np
import pytest

from edgeptycho.physics import metrics, simulate
from edgeptycho.physics.epie import EpieOptions, solve
from edgeptycho.physics.epie_updates import step_gain
from edgeptycho.pipeline.refine import flat_options, refine


def _scan(dose, seed=3):
    return simulate.simulate(simulate.preset("small").replace(noise={"dose": dose}), seed=seed)


@pytest.fixture(scope="module")
def clean():
    return _scan(None)


@pytest.fixture(scope="module")
def noisy():
    return _scan(1e4, seed=5)


def _pos(scan):
    return scan.positions_m / scan.metadata["object_pixel_m"]


def _err(scan, obj):
    mask = metrics.illuminated_mask(scan.object_truth.shape, scan.probe, _pos(scan))
    return metrics.phase_nrmse(obj, scan.object_truth, mask)


def test_momentum_converges_much_faster_than_rpie_from_flat(clean):
    obj0 = np.ones_like(clean.object_truth)
    kw = dict(batch_size=8, momentum_every=16)
    rpie = solve(clean.frames, _pos(clean), clean.probe, obj0, 15, method="rpie", **kw)
    mpie = solve(clean.frames, _pos(clean), clean.probe, obj0, 15, method="mpie", **kw)
    assert _err(clean, mpie.object) < 0.3 * _err(clean, rpie.object)
    assert mpie.convergence[-1] < 0.3 * rpie.convergence[-1]


def test_truth_stays_a_fixed_point_with_object_and_probe_momentum(clean):
    res = solve(clean.frames, _pos(clean), clean.probe, clean.object_truth, 3, method="mpie", batch_size=8,
                momentum_every=8, probe_update_start=0)
    assert res.convergence.max() < 1e-6
    assert metrics.complex_nrmse(res.object, clean.object_truth) < 1e-3


def test_step_gain_decays_geometrically_to_the_final_factor():
    gains = [step_gain(i, 20, 5, 0.1) for i in range(20)]
    assert gains[:15] == [1.0] * 15
    assert np.isclose(gains[-1], 0.1) and np.all(np.diff(gains[14:]) < 0)
    assert np.isclose(gains[15], 0.1 ** 0.2)
    assert step_gain(3, 20, 0, 0.1) == 1.0


@pytest.mark.parametrize("method", ["rpie", "mpie"])
def test_annealing_the_last_steps_lowers_the_noise_floor_of_the_modulus_projection(noisy, method):
    obj0 = np.ones_like(noisy.object_truth)
    kw = dict(method=method, noise_model="gaussian")
    plain = solve(noisy.frames, _pos(noisy), noisy.probe, obj0, 40, **kw)
    annealed = solve(noisy.frames, _pos(noisy), noisy.probe, obj0, 40, anneal_iters=10, anneal_to=0.1, **kw)
    assert _err(noisy, annealed.object) < _err(noisy, plain.object)


def test_poisson_correction_beats_the_modulus_projection_at_low_dose(noisy):
    obj0 = np.ones_like(noisy.object_truth)
    gauss = solve(noisy.frames, _pos(noisy), noisy.probe, obj0, 40, noise_model="gaussian")
    poisson = solve(noisy.frames, _pos(noisy), noisy.probe, obj0, 40)
    assert _err(noisy, poisson.object) < 0.95 * _err(noisy, gauss.object)


def test_flat_refinement_anneals_by_default_and_a_seeded_one_does_not(noisy):
    opts = flat_options(200)
    assert opts.method == "mpie" and opts.noise_model == "poisson"
    assert opts.anneal_iters == 50 and opts.anneal_to < 1
    default = refine(noisy, None, n_iters=12)
    annealed = refine(noisy, None, n_iters=12, options=flat_options(12))
    plain = refine(noisy, None, n_iters=12, options=EpieOptions())
    assert default.program["method"] == "mpie"
    np.testing.assert_array_equal(default.object, annealed.object)
    assert not np.array_equal(default.object, plain.object)
    seed = annealed.object
    np.testing.assert_array_equal(refine(noisy, seed, n_iters=3).object,
                                  refine(noisy, seed, n_iters=3, options=EpieOptions()).object)


@pytest.mark.slow
def test_mpie_with_probe_update_agrees_between_numpy_and_torch(clean):
    pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    seed = (clean.object_truth * np.exp(0.3j * rng.standard_normal(clean.object_truth.shape))).astype(np.complex64)
    args = (clean.frames, _pos(clean), clean.probe, seed, 4)
    kw = dict(method="mpie", batch_size=8, momentum_every=8, probe_update_start=1, anneal_iters=2, anneal_to=0.5)
    ref = solve(*args, **kw)
    tor = solve(*args, backend="torch", device="cpu", **kw)
    np.testing.assert_allclose(tor.object, ref.object, atol=1e-4)
    np.testing.assert_allclose(tor.probe, ref.probe, atol=1e-4 * np.abs(ref.probe).max())
    np.testing.assert_allclose(tor.convergence, ref.convergence, rtol=1e-4)


@pytest.mark.parametrize("field, value, match", [
    ("momentum", 1.0, "friction"), ("momentum_gain", 1.5, "momentum_gain"), ("momentum_every", 0, "momentum_every"),
    ("anneal_to", 0.0, "anneal_to"), ("anneal_iters", -1, "anneal_iters"), ("noise_model", "l2", "noise_model"),
    ("poisson_clip", 0.0, "poisson_clip")])
def test_bad_momentum_and_annealing_options_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        EpieOptions(**{field: value})
