"""Range observers: the histogram merges exactly, each method picks the threshold it promises."""

from __future__ import annotations

import numpy as np
import pytest

from edgeptycho.quantization.observers import AbsHistogram, make_observer, weight_fix_point
from edgeptycho.quantization.qdq import pow2_fix_point, quantize_pow2_weights

RNG = np.random.default_rng(3)


def heavy_tailed(n=200_000, outlier=40.0):
    x = RNG.normal(0, 1, n).astype(np.float32)
    x[:3] = [outlier, -outlier * 0.9, outlier * 0.7]
    return x


def test_histogram_grows_by_exact_pairwise_merges():
    a = RNG.uniform(-0.7, 0.7, 10_000).astype(np.float32)
    b = RNG.uniform(-5.3, 5.3, 10_000).astype(np.float32)
    h = AbsHistogram(256)
    h.update(a)
    h.update(b)
    assert h.top == 8.0 and h.amax == pytest.approx(np.abs(np.concatenate([a, b])).max())
    direct = np.bincount(np.minimum((np.abs(np.concatenate([a, b])) * (256 / 8.0)).astype(int), 255),
                         minlength=256)
    np.testing.assert_array_equal(h.counts, direct)


def test_minmax_covers_every_value_and_its_pow2_never_overflows():
    x = heavy_tailed()
    obs = make_observer("minmax")
    obs.update(x[:1000])
    obs.update(x[1000:])
    assert obs.amax() == pytest.approx(40.0)
    fp = obs.fix_point()
    assert fp == pow2_fix_point(40.0) == 1 and 127 * 2.0**-fp >= 40.0 > 127 * 2.0 ** -(fp + 1)


@pytest.mark.parametrize("name, top", [("percentile", 15.0), ("entropy", 15.0), ("mse", 39.0)])
def test_clipping_observers_clip_rare_outliers(name, top):
    x = heavy_tailed()
    obs = make_observer(name)
    obs.update(x)
    assert 2.0 < obs.amax() < top, obs.amax()  # the 40σ outliers are clipped (MSE weighs them: less so)
    assert obs.fix_point() >= 2  # min-max needs fix_point 1 to hold the outlier


def test_mse_observer_minimises_the_true_quantisation_error():
    x = heavy_tailed()
    obs = make_observer("mse")
    obs.update(x)

    def err(t):
        s = t / 127.0
        return float(np.mean((np.clip(np.floor(np.abs(x) / s + 0.5), 0, 127) * s - np.abs(x)) ** 2))

    best = obs.amax()
    for t in (best * 0.6, best * 1.6, 40.0):
        assert err(best) < err(t)
    assert obs.mse(best) == pytest.approx(err(best), rel=0.15)
    fp = obs.fix_point()
    assert err(127 * 2.0**-fp) <= min(err(127 * 2.0**-f) for f in (fp - 1, fp + 1))


def test_entropy_observer_handles_relu_outputs():
    x = np.maximum(RNG.exponential(1.0, 100_000), 0).astype(np.float32)
    x[: x.size // 2] = 0.0
    x[0] = 60.0
    obs = make_observer("entropy")
    obs.update(x)
    assert 3.0 < obs.amax() < 30.0
    assert obs.fix_point() >= pow2_fix_point(60.0) + 1


def test_unknown_observer_and_empty_observer_are_errors():
    with pytest.raises(ValueError, match="unknown observer 'kl'"):
        make_observer("kl")
    with pytest.raises(ValueError, match="seen no data"):
        make_observer("mse").amax()
    with pytest.raises(ValueError, match="inf/NaN"):
        make_observer("minmax").update(np.array([1.0, np.nan], np.float32))


def test_weight_fix_point_mse_never_loses_to_non_overflow():
    w = RNG.normal(0, 0.05, 20_000).astype(np.float32)
    w[0] = 0.6  # one outlier weight: holding it costs every other weight a bit of resolution

    def err(fp):
        return float(np.sum((quantize_pow2_weights(w, fp) * 2.0**-fp - w) ** 2))

    fp_mm, fp_mse = weight_fix_point(w, "minmax"), weight_fix_point(w, "mse")
    assert fp_mm == pow2_fix_point(0.6) and err(fp_mse) <= err(fp_mm) and fp_mse > fp_mm


def test_weights_round_half_away_from_zero():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 300.0], np.float32)
    assert quantize_pow2_weights(x, 0).tolist() == [1, 2, 3, -1, -2, -3, 127]
