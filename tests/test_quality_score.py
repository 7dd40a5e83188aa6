"""The monitor's score: overlap disagreement of a patch with its neighbours, delayed scoring, the product."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from edgeptycho.physics.forward import extract_patches
from edgeptycho.pipeline.live_stitch import LiveStitcher
from edgeptycho.pipeline.score import DelayedScores, combined_score
from edgeptycho.pipeline.stitcher import canvas_for
from edgeptycho.pipeline.trust import QualityConfig

M = 32


def _consistent_patches(n_side=6, step=8, seed=0):
    """Patches cut from one smooth complex object on an overlapping raster, and their weight."""
    rng = np.random.default_rng(seed)
    obj = (0.8 + 0.2 * gaussian_filter(rng.random((160, 160)), 3)) * np.exp(
        1j * 4 * gaussian_filter(rng.standard_normal((160, 160)), 3))
    g = 40 + step * np.arange(n_side)
    pos = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2).astype(float)
    patches = extract_patches(obj.astype(np.complex64), pos, M)
    y = np.arange(M) - M / 2 + 0.5
    weight = np.exp(-(y[:, None] ** 2 + y[None] ** 2) / (2 * 7.0**2)).astype(np.float32)
    return patches, pos, weight


def _stitched(patches, pos, weight):
    shape, origin = canvas_for(pos, M)
    st = LiveStitcher(shape, M, weight, origin_px=origin)
    st.add_batch(np.abs(patches), np.angle(patches), pos)
    return st


def test_a_patch_that_disagrees_with_its_neighbours_stands_out_by_its_phase_error():
    patches, pos, weight = _consistent_patches()
    bad = 14  # an interior patch: neighbours on every side
    rng = np.random.default_rng(1)
    noise = 0.4 * gaussian_filter(rng.standard_normal((M, M)), 1.5) / 0.19  # smooth, ~0.4 rad RMS
    patches[bad] *= np.exp(1j * noise)
    patches *= np.exp(1j * rng.uniform(-np.pi, np.pi, len(patches)))[:, None, None]  # no global phase is fixed
    st = _stitched(patches, pos, weight)
    d = st.disagreement(np.abs(patches), np.angle(patches), pos, placed=np.ones(len(pos), bool))
    others = np.delete(d, bad)
    assert np.isfinite(d).all()
    assert d[bad] > 5 * np.median(others)
    rms = np.sqrt((weight * (noise - np.average(noise, weights=weight)) ** 2).sum() / weight.sum())
    assert d[bad] == pytest.approx(rms, rel=0.35)
    # left in the mosaic it compares with itself too, and looks better than it is
    inside = st.disagreement(np.abs(patches[bad:bad + 1]), np.angle(patches[bad:bad + 1]), pos[bad:bad + 1])
    assert inside[0] < 0.9 * d[bad]


def test_a_patch_with_no_neighbour_yet_has_no_disagreement():
    patches, pos, weight = _consistent_patches()
    shape, origin = canvas_for(pos, M)
    st = LiveStitcher(shape, M, weight, origin_px=origin)
    d = st.disagreement(np.abs(patches[:2]), np.angle(patches[:2]), pos[:2])
    assert np.isnan(d).all()


def test_combined_score_fills_unknown_disagreement_and_alpha_zero_is_the_residual():
    r = np.array([0.1, 0.2, 0.3])
    d = np.array([0.04, np.nan, 0.16])
    np.testing.assert_allclose(combined_score(r, d, 0.5, fill=0.09), [0.02, 0.06, 0.12], rtol=1e-6)
    np.testing.assert_allclose(combined_score(r, d, 0.5), [0.02, 0.2, 0.12], rtol=1e-6)  # no fill: residual
    np.testing.assert_allclose(combined_score(r, d, 0.0), r, rtol=1e-6)


def test_frames_are_scored_once_their_successors_are_in_the_mosaic_and_all_at_the_end():
    patches, pos, weight = _consistent_patches()
    n = len(pos)
    shape, origin = canvas_for(pos, M)
    st = LiveStitcher(shape, M, weight, origin_px=origin)
    scorer = DelayedScores(delay=10, alpha=0.5)
    amp, ph = np.abs(patches), np.angle(patches)
    got = []
    for s in range(0, n, 6):
        idx = np.arange(s, min(s + 6, n))
        scorer.add(idx, amp[idx], ph[idx], pos[idx], np.full(len(idx), 0.1), idx.tolist())
        keys, res, dis, score = scorer.collect(st, final=False)
        assert all(k + 10 < st.n_added for k in keys)  # nothing before its 10 successors were placed
        got += keys
        st.add_batch(amp[idx], ph[idx], pos[idx])
    assert len(scorer) == n - len(got) > 0
    keys, res, dis, score = scorer.collect(st, final=True)
    assert sorted(got + keys) == list(range(n)) and len(scorer) == 0
    assert np.isfinite(score).all() and (score > 0).all()


def test_bad_score_settings_name_the_key():
    with pytest.raises(ValueError, match="score_alpha"):
        QualityConfig(score_alpha=-1)
    with pytest.raises(ValueError, match="score_delay"):
        QualityConfig(score_delay=-5)
    with pytest.raises(ValueError, match="delay"):
        DelayedScores(delay=-1)
