"""Probes, objects and scans: zone-plate optics, propagation, modes, loading, object and trajectory generators."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from edgeptycho.physics import objects, probes, scans
from edgeptycho.physics.fourier import EV, object_pixel_size, wavelength_from_energy

LAM = wavelength_from_energy(10_000 * EV)
DX = object_pixel_size(LAM, 1.55, 256, 75e-6)  # ≈ 10 nm


def test_zone_plate_far_field_is_an_annulus_with_dark_central_stop():
    n, stop, outer = 256, 0.3, 30e-9
    probe = probes.zone_plate_probe(n, DX, LAM, 160e-6, outer, central_stop=stop, defocus_m=133e-6)
    ff = probes.probe_far_field_intensity(probe[None])
    r_out = n * DX / (2 * outer)  # NA/λ in frequency pixels
    k = np.arange(n) - n // 2
    r = np.hypot(k[:, None], k[None, :])
    ring = ff[(r > stop * r_out + 2) & (r < r_out - 2)].mean()
    assert ff[r < stop * r_out - 2].max() < 1e-6 * ring  # the central stop's shadow is dark
    assert ff[r > r_out + 2].max() < 1e-6 * ring         # nothing beyond the numerical aperture
    # defocused beam ≈ 2·NA·defocus across (geometric optics), NA = λ / (2·outer zone)
    geometric = 2 * LAM / (2 * outer) * 133e-6 / DX
    assert probes.probe_diameter_px(probe) == pytest.approx(geometric, rel=0.15)


def test_zone_plate_pixel_too_coarse_for_aperture_is_rejected():
    with pytest.raises(ValueError, match="outer zone"):
        probes.zone_plate_probe(64, 40e-9, LAM, 160e-6, 30e-9)


@pytest.mark.parametrize("distance", [50e-6, -50e-6, 400e-6])  # also beyond the full-band limit n·Δx²/λ
def test_fresnel_propagation_conserves_energy_and_inverts(distance):
    field = probes.gaussian_probe(256, 30.0).astype(np.complex128)
    out = probes.fresnel_propagate(field, DX, LAM, distance)
    assert np.sum(np.abs(out) ** 2) == pytest.approx(np.sum(np.abs(field) ** 2), rel=1e-9)
    np.testing.assert_allclose(probes.fresnel_propagate(out, DX, LAM, -distance), field, atol=1e-8)


def test_fresnel_propagation_refuses_to_wrap_around_the_window():
    with pytest.raises(ValueError, match="window"):
        probes.fresnel_propagate(probes.gaussian_probe(64, 3.0), DX, LAM, 5e-3)


def test_gaussian_beam_spreads_like_paraxial_theory():
    # waist w0 (1/e² intensity radius): w(z) = w0·√(1 + (z/zR)²), zR = π w0² / λ
    for fwhm in (6.0, 12.0):  # zR = 2 zR' … below and above the angular-spectrum limit n·Δx²/λ
        w0 = fwhm / np.sqrt(2 * np.log(2)) * DX
        z = 2 * np.pi * w0**2 / LAM
        out = probes.fresnel_propagate(probes.gaussian_probe(256, fwhm).astype(np.complex128), DX, LAM, z)
        inten = np.abs(out) ** 2
        k = (np.arange(256) - 128) * DX
        w_meas = 2 * np.sqrt(np.sum(inten * k[:, None] ** 2) / inten.sum())  # 1/e² radius = 2σ
        assert w_meas == pytest.approx(w0 * np.sqrt(1 + 4), rel=0.02)


def test_incoherent_modes_orthogonal_decreasing_and_power_preserving():
    p = probes.zone_plate_probe(128, DX, LAM, 160e-6, 30e-9, defocus_m=60e-6)
    modes = probes.incoherent_modes(p, 4, blur_px=(0.8, 1.3))
    flat = modes.reshape(4, -1).astype(np.complex128)
    gram = flat @ flat.conj().T
    off = gram - np.diag(np.diag(gram))
    assert np.abs(off).max() < 1e-4 * np.abs(gram).max()
    powers = probes.mode_powers(modes)
    assert np.all(np.diff(powers) <= 1e-7) and powers[0] < 0.99
    assert np.sum(np.abs(modes) ** 2) == pytest.approx(np.sum(np.abs(p) ** 2), rel=1e-5)
    assert probes.incoherent_modes(p, 1).shape == (1, 128, 128)


def test_normalize_probe_and_diameter():
    modes = probes.normalize_probe(probes.incoherent_modes(probes.gaussian_probe(64, 10.0), 2, 1.0), 1e6)
    assert np.sum(np.abs(modes) ** 2) == pytest.approx(1e6, rel=1e-5)
    # a flat disc of radius R holds 90 % of its energy within radius R·√0.9
    disc = (np.hypot(*np.mgrid[-32:32, -32:32]) <= 20).astype(np.complex64)
    assert probes.probe_diameter_px(disc) == pytest.approx(2 * 20 * np.sqrt(0.9), abs=1.0)
    with pytest.raises(ValueError, match="photon"):
        probes.normalize_probe(modes, -1)


def test_load_probe_from_npy_npz_cxi_and_ptychodus(tmp_path):
    modes = probes.incoherent_modes(probes.gaussian_probe(32, 6.0), 2, 1.0)
    np.save(tmp_path / "p.npy", modes[0])
    np.savez(tmp_path / "p.npz", probe=modes, other=np.zeros(3))
    with h5py.File(tmp_path / "p.cxi", "w") as f:
        f["entry_1/instrument_1/source_1/illumination"] = modes
    with h5py.File(tmp_path / "product.h5", "w") as f:
        f["probe"] = modes[None]  # ptychodus: OPR × incoherent × H × W
    assert probes.load_probe(tmp_path / "p.npy").shape == (1, 32, 32)
    for name in ("p.npz", "p.cxi", "product.h5"):
        np.testing.assert_array_equal(probes.load_probe(tmp_path / name), modes)
    with pytest.raises(ValueError, match="larger than the detector frame"):
        probes.fit_to_frame(modes, 16)
    padded = probes.fit_to_frame(modes, 64)
    assert padded.shape == (2, 64, 64) and padded[0, 32, 32] == modes[0, 16, 16]


@pytest.mark.parametrize("kind", objects.OBJECT_KINDS)
def test_objects_are_bounded_deterministic_and_unwrapped(kind):
    a = objects.make_object(kind, (97, 130), seed=4)
    b = objects.make_object(kind, (97, 130), seed=4)
    c = objects.make_object(kind, (97, 130), seed=5)
    assert a.dtype == np.complex64 and a.shape == (97, 130)
    np.testing.assert_array_equal(a, b)
    assert kind == "siemens-star" or not np.array_equal(a, c)
    amp, ph = np.abs(a), np.angle(a)
    assert amp.min() > 0 and amp.max() <= 1.0 + 1e-6
    assert np.ptp(ph) > 0.3 and np.abs(ph).max() < np.pi - 0.5  # contrast, and no wrapping by default
    pr = objects.make_object(kind, 64, seed=1, phase_range=0.5)
    assert np.ptp(np.angle(pr)) <= 0.5 + 1e-5


def test_unknown_object_kind_lists_the_kinds():
    with pytest.raises(ValueError, match="siemens-star.*texture"):
        objects.make_object("moon", (32, 32), 0)
    with pytest.raises(ValueError, match="amplitude_min"):
        objects.make_object("ic", (32, 32), 0, amplitude_min=0.0)


def test_step_from_overlap_and_bad_values():
    assert scans.step_from_overlap(60.0, 0.7) == pytest.approx(18.0)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="overlap"):
            scans.step_from_overlap(60.0, bad)
    with pytest.raises(ValueError, match="step"):
        scans.make_scan("raster", 10, 0.0)
    with pytest.raises(ValueError, match="raster"):
        scans.make_scan("zigzag", 10, 5.0)


@pytest.mark.parametrize("kind", scans.SCAN_KINDS)
def test_scans_have_requested_count_spacing_and_fit_the_object(kind):
    step, n = 10.0, 64
    pos = scans.make_scan(kind, 100, step, jitter_px=0.4, seed=3, window=n, margin=5)
    assert pos.shape == (100, 2)
    d = np.hypot(*(pos[:, None, :] - pos[None, :, :]).transpose(2, 0, 1))
    np.fill_diagonal(d, np.inf)
    assert np.median(d.min(axis=1)) == pytest.approx(step, rel=0.25)
    shape = scans.object_shape_for_scan(pos, n, 5)
    lo = np.floor(pos) - n // 2
    hi = lo + n
    assert lo.min() == 5 and hi[:, 0].max() + 5 == shape[0] and hi[:, 1].max() + 5 == shape[1]
    np.testing.assert_array_equal(pos, scans.make_scan(kind, 100, step, 0.4, seed=3, window=n, margin=5))


def test_jitter_is_bounded():
    base = scans.make_scan("raster", 25, 8.0)
    jit = scans.make_scan("raster", 25, 8.0, jitter_px=0.5, seed=0)
    assert 0 < np.abs(jit - base).max() <= 0.5
