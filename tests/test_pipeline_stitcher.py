"""Stitcher: true patches with random phase offsets stitch back to the object, offline and live."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edgeptycho.physics import metrics
from edgeptycho.physics.forward import extract_patches
from edgeptycho.physics.objects import make_object
from edgeptycho.physics.probes import gaussian_probe
from edgeptycho.physics.scans import make_scan, object_shape_for_scan
from edgeptycho.pipeline.stitcher import LiveStitcher, patch_corners, probe_weight, stitch

N_WIN, M = 64, 32


def _case(n_pos=150, subpixel=False, seed=0):
    rng = np.random.default_rng(seed)
    pos = make_scan("spiral", n_pos, 8.0, seed=seed, window=N_WIN, margin=2)
    if subpixel:
        pos = pos + rng.uniform(-0.5, 0.5, pos.shape)
    else:
        pos = np.round(pos)
    shape = object_shape_for_scan(pos, N_WIN, margin=4)
    obj = make_object("siemens-star", shape, seed=seed)
    patches = extract_patches(obj, pos, M)
    offsets = rng.uniform(-np.pi, np.pi, len(pos))
    shifted = patches * np.exp(1j * offsets)[:, None, None]
    weight = probe_weight(gaussian_probe(N_WIN, 24.0), M)
    return obj, pos, shifted, offsets, weight


def _errors(recon_obj, obj, weight_map):
    mask = weight_map > 0.3 * weight_map.max()  # well inside the scanned area
    return metrics.phase_nrmse(recon_obj, obj, mask), metrics.complex_nrmse(recon_obj, obj, mask)


@pytest.mark.parametrize("method", ["lsq", "greedy"])
def test_random_offsets_are_reconciled(method):
    obj, pos, patches, offsets, w = _case()
    res = stitch(np.abs(patches), np.angle(patches), pos, w, canvas_shape=obj.shape, method=method)
    ph, cx = _errors(res.object, obj, res.weight)
    assert ph < 1e-4 and cx < 1e-4
    # The offsets found are the ones added, up to one global constant.
    diff = np.angle(np.exp(1j * (res.offsets - offsets)))
    assert np.ptp(np.angle(np.exp(1j * (diff - diff[0])))) < 1e-3


def test_without_reconciliation_random_offsets_ruin_the_mosaic():
    obj, pos, patches, _, w = _case()
    res = stitch(np.abs(patches), np.angle(patches), pos, w, canvas_shape=obj.shape, method="none")
    assert _errors(res.object, obj, res.weight)[1] > 0.3


def test_subpixel_positions_fourier_shift_beats_rounding():
    obj, pos, patches, _, w = _case(subpixel=True)
    args = (np.abs(patches), np.angle(patches), pos, w)
    fine = stitch(*args, canvas_shape=obj.shape, subpixel=True)
    rounded = stitch(*args, canvas_shape=obj.shape, subpixel=False)
    e_fine = _errors(fine.object, obj, fine.weight)[1]
    e_round = _errors(rounded.object, obj, rounded.weight)[1]
    assert e_fine < 0.5 * e_round
    assert e_fine < 0.03


def test_default_canvas_keeps_object_pixel_coordinates():
    obj, pos, patches, _, w = _case()
    res = stitch(np.abs(patches), np.angle(patches), pos, w)
    assert res.origin_px == (0, 0)
    h, wd = res.object.shape
    corners = patch_corners(pos, M)
    assert (h, wd) == tuple(int(v) for v in corners.max(axis=0) + M)
    ph, _ = _errors(res.object, obj[:h, :wd], res.weight)
    assert ph < 1e-4


def test_patches_partly_off_the_canvas_are_clipped():
    obj, pos, patches, _, w = _case()
    small = (obj.shape[0] // 2, obj.shape[1] // 2)
    res = stitch(np.abs(patches), np.angle(patches), pos, w, canvas_shape=small)
    assert res.object.shape == small
    ph, _ = _errors(res.object, obj[: small[0], : small[1]], res.weight)
    assert ph < 1e-3


@pytest.mark.parametrize("batch", [1, 16, 64])
def test_live_stitcher_matches_the_object(batch):
    obj, pos, patches, _, w = _case()
    live = LiveStitcher(obj.shape, M, w)
    for s in range(0, len(pos), batch):
        live.add_batch(np.abs(patches[s:s + batch]), np.angle(patches[s:s + batch]), pos[s:s + batch])
    assert live.n_added == len(pos)
    ph, cx = _errors(live.snapshot(), obj, live.weight_map())
    assert ph < 1e-4 and cx < 1e-4


def test_live_snapshot_from_another_thread_never_blocks_or_corrupts():
    obj, pos, patches, _, w = _case(n_pos=200)
    live = LiveStitcher(obj.shape, M, w)
    stop = threading.Event()
    shots = []

    def reader():
        while not stop.is_set():
            snap = live.snapshot()
            assert np.isfinite(snap).all()
            shots.append(1)

    t = threading.Thread(target=reader)
    t.start()
    for s in range(0, len(pos), 8):
        live.add_batch(np.abs(patches[s:s + 8]), np.angle(patches[s:s + 8]), pos[s:s + 8])
    stop.set()
    t.join()
    assert shots
    ph, _ = _errors(live.snapshot(), obj, live.weight_map())  # the last snapshot sees every add
    assert ph < 1e-4


def test_bad_inputs_name_the_problem():
    _, pos, patches, _, w = _case(n_pos=20)
    a, p = np.abs(patches), np.angle(patches)
    with pytest.raises(ValueError, match="positions"):
        stitch(a, p, pos[:-1], w)
    with pytest.raises(ValueError, match="weight"):
        stitch(a, p, pos, w[:-1])
    with pytest.raises(ValueError, match="phase shape"):
        stitch(a, p[:, :-1], pos, w)
    with pytest.raises(ValueError, match="method"):
        stitch(a, p, pos, w, method="magic")


def test_probe_weight_is_the_central_probe_intensity():
    probe = gaussian_probe(N_WIN, 20.0)
    w = probe_weight(probe, M)
    assert w.shape == (M, M) and np.isclose(w.max(), 1.0)
    assert np.unravel_index(np.argmax(w), w.shape) == (M // 2, M // 2)


def test_live_amplitude_and_phase_track_the_mosaic_region_by_region():
    obj, pos, patches, _, w = _case(n_pos=80)
    live = LiveStitcher(obj.shape, M, w)
    for s in range(0, len(pos), 20):
        live.add_batch(np.abs(patches[s:s + 20]), np.angle(patches[s:s + 20]), pos[s:s + 20])
        amp, phase = live.snapshot_amp_phase()
        mosaic = live.snapshot()
        np.testing.assert_allclose(amp, np.abs(mosaic), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(phase, np.angle(mosaic), atol=1e-6)


def test_a_tilt_in_every_patch_does_not_become_a_ramp_across_the_mosaic():
    """A CNN biased to tilt every patch by g rad/px: the offset solve integrates g into a ramp across the
    whole object; remove_ramp=True measures it from the overlaps and takes it out."""
    from edgeptycho.model.dataset import reference_phase

    obj, pos, patches, offsets, w = _case(n_pos=200)
    true = patches * np.exp(-1j * offsets)[:, None, None]
    referenced = np.abs(true) * np.exp(1j * reference_phase(true, w))  # the CNN's label convention
    g = np.array([0.004, -0.003])  # rad per pixel (row, col)
    yy, xx = np.mgrid[:M, :M] - M // 2
    tilted = referenced * np.exp(1j * (g[0] * yy + g[1] * xx))[None]
    a, p = np.abs(tilted), np.angle(tilted)
    fixed = stitch(a, p, pos, w, canvas_shape=obj.shape, remove_ramp=True)
    assert fixed.ramp == pytest.approx(tuple(g), abs=2e-4)
    kept = stitch(a, p, pos, w, canvas_shape=obj.shape)
    e_fixed, e_kept = _errors(fixed.object, obj, fixed.weight)[0], _errors(kept.object, obj, kept.weight)[0]
    assert e_fixed < 0.05 < e_kept


def test_the_objects_own_phase_ramp_survives_the_default_stitch():
    """An object whose phase rises across the field, seen by an untilted model (patches referenced to their
    own mean phase, as the labels are): the overlaps show the same trend a tilted model would make, so
    remove_ramp would take the object's ramp away; the default keeps it."""
    from edgeptycho.model.dataset import reference_phase

    obj, pos, patches, offsets, w = _case(n_pos=200)
    g = np.array([0.003, -0.002])  # rad per pixel (row, col): ~1 rad across the field
    rr, cc = np.mgrid[:obj.shape[0], :obj.shape[1]]
    sloped = obj * np.exp(1j * (g[0] * rr + g[1] * cc))
    true = extract_patches(sloped, pos, M)
    referenced = np.abs(true) * np.exp(1j * reference_phase(true, w))
    a, p = np.abs(referenced), np.angle(referenced)
    kept = stitch(a, p, pos, w, canvas_shape=obj.shape)
    assert kept.ramp == (0.0, 0.0)
    removed = stitch(a, p, pos, w, canvas_shape=obj.shape, remove_ramp=True)
    assert removed.ramp == pytest.approx(tuple(g), abs=3e-4)
    e_kept, e_removed = _errors(kept.object, sloped, kept.weight)[0], _errors(removed.object, sloped, removed.weight)[0]
    assert e_kept < 0.05 < e_removed


def test_ramp_removal_is_on_for_int8_models_only_unless_set():
    from edgeptycho.config import ConfigError, from_mapping
    from edgeptycho.pipeline.settings import ServeConfig
    from edgeptycho.pipeline.stitcher import ramp_removal

    int8 = {"quantization": {"scheme": "dpu-pow2", "precision": "int8"}}
    fp16 = {"quantization": {"scheme": "fp16", "precision": "fp16"}}
    assert ramp_removal("auto", int8) is True
    assert ramp_removal("auto", fp16) is False and ramp_removal("auto", {}) is False
    assert ramp_removal(False, int8) is False and ramp_removal(True, {}) is True
    with pytest.raises(ValueError, match="remove_ramp"):
        ramp_removal("sometimes", {})
    assert from_mapping(ServeConfig, {}).stitch.remove_ramp == "auto"
    with pytest.raises(ConfigError, match="stitch.remove_ramp"):
        from_mapping(ServeConfig, {"stitch": {"remove_ramp": "sometimes"}})
