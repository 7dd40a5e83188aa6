"""With remove_ramp, the live mosaic removes the CNN's phase ramp as the final stitch does, at snapshot time,
paste-safe; by default both keep it."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from edgeptycho.physics.forward import extract_patches
from edgeptycho.physics.probes import gaussian_probe
from edgeptycho.pipeline.stitcher import LiveStitcher, probe_weight, stitch

M, S = 32, 220


def _tilted(tilt):
    """Patches of a smooth object, each tilted by `tilt` rad/px about its centre, with the training labels'
    phase reference (probe-weighted circular mean removed per patch)."""
    rng = np.random.default_rng(0)
    ph = gaussian_filter(rng.normal(0, 1, (S, S)), 3)
    obj = ((0.8 + 0.2 * rng.random((S, S))) * np.exp(1j * ph / ph.std())).astype(np.complex64)
    g = np.arange(20, S - 20, 10, dtype=float)
    pos = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2) + rng.uniform(-0.5, 0.5, (len(g) ** 2, 2))
    w = probe_weight(gaussian_probe(M, 14.0)[None], M)
    yy, xx = np.mgrid[:M, :M] - M // 2
    p = extract_patches(obj, pos, M, subpixel=False) * np.exp(1j * (tilt[0] * yy + tilt[1] * xx))[None]
    cm = (p * w).sum(axis=(1, 2))
    p = p * np.conj(cm / np.abs(cm))[:, None, None]
    return obj, np.abs(p).astype(np.float32), np.angle(p).astype(np.float32), pos, w


def _ramp_vs_truth(mosaic, obj, mask):
    z = mosaic * np.conj(obj)
    rr, cc = np.nonzero(mask)
    e = np.angle(z[mask] * np.conj(z[mask].sum()))
    A = np.stack([np.ones(len(rr)), rr, cc], 1)
    return np.linalg.lstsq(A, e, rcond=None)[0][1:]


def _live(amp, ph, pos, w, **kw):
    live = LiveStitcher((S, S), M, w, **kw)
    for s in range(0, len(pos), 16):
        live.add_batch(amp[s:s + 16], ph[s:s + 16], pos[s:s + 16])
        if s % 128 == 0:
            live.snapshot()  # the monitor's rate: the ramp is re-estimated as patches arrive
    return live


def test_live_mosaic_loses_the_cnn_ramp_like_the_final_stitch():
    tilt = (0.004, -0.003)
    obj, amp, ph, pos, w = _tilted(tilt)
    live = _live(amp, ph, pos, w, remove_ramp=True)
    raw = _live(amp, ph, pos, w)
    mask = live.weight_map() > 0.5 * live.weight_map().max()
    before = _ramp_vs_truth(raw.snapshot(), obj, mask)
    after = _ramp_vs_truth(live.snapshot(), obj, mask)
    assert np.hypot(*before) > 0.7 * np.hypot(*tilt)  # the greedy alignment integrates the tilt into a ramp
    assert np.hypot(*after) < 0.35 * np.hypot(*tilt)
    final = stitch(amp, ph, pos, w, canvas_shape=(S, S), subpixel=False, remove_ramp=True)
    # both estimates carry the object's content (neighbours' differing phase references): the same accuracy
    live_err, final_err = np.hypot(*np.subtract(live.ramp, tilt)), np.hypot(*np.subtract(final.ramp, tilt))
    assert live_err < 0.4 * np.hypot(*tilt) and live_err < final_err + 0.0005
    assert live.result().ramp == live.ramp and raw.ramp == (0.0, 0.0)
    # a refined region pasted from the rendered mosaic comes back unchanged (the sums keep the ramp)
    snap = live.snapshot()
    live.paste((80, 120, 90, 130), snap[80:120, 90:130])
    got = live.snapshot()[80:120, 90:130]
    np.testing.assert_allclose(got * np.exp(-1j * np.angle(np.vdot(snap[80:120, 90:130], got))),
                               snap[80:120, 90:130], atol=2e-3)


def test_patches_without_a_tilt_keep_the_mosaic_as_it_was():
    obj, amp, ph, pos, w = _tilted((0.0, 0.0))
    live = _live(amp, ph, pos, w, remove_ramp=True)
    raw = _live(amp, ph, pos, w)
    assert live.ramp == (0.0, 0.0)
    np.testing.assert_array_equal(live.snapshot(), raw.snapshot())
