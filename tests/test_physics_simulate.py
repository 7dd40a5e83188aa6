"""simulate(): presets, spec validation naming the field, determinism, dose and probe consistency."""

from __future__ import annotations

import numpy as np
import pytest

from edgeptycho.physics import forward
from edgeptycho.physics.simulate import (
    PRESET_NAMES,
    NoiseSpec,
    ProbeSpec,
    ScanSpec,
    SimulationSpec,
    preset,
    simulate,
)


@pytest.fixture(scope="module")
def small():
    return simulate(preset("small"), seed=11)


def test_small_preset_scan_is_complete_and_consistent(small):
    s = small
    n = s.frame_size
    assert s.frames.shape == (49, 64, 64) and s.frames.dtype == np.uint32
    assert s.probe.shape == (2, n, n) and s.object_truth.dtype == np.complex64
    assert s.object_pixel_m == pytest.approx(10e-9, rel=0.01)
    assert s.metadata["object_pixel_m"] == pytest.approx(s.object_pixel_m)
    assert s.metadata["preset"] == "small" and s.metadata["seed"] == 11
    assert SimulationSpec.from_dict(s.metadata["spec"]) == preset("small")
    # probe normalised to the incident dose; frames hold the transmitted photons (amplitude ≤ 1)
    dose = preset("small").noise.dose
    assert np.sum(np.abs(s.probe) ** 2) == pytest.approx(dose, rel=1e-4)
    sums = s.frames.sum(axis=(1, 2), dtype=np.float64)
    amin = np.abs(s.object_truth).min()
    assert amin**2 * dose * 0.9 < sums.mean() <= dose * 1.01
    # the stored probe and positions reproduce the frames' expectation
    expected = forward.diffraction_intensity(s.object_truth, s.probe, s.positions_px())
    assert sums.mean() == pytest.approx(expected.sum(axis=(1, 2)).mean(), rel=3 / np.sqrt(sums.sum()) + 1e-3)
    np.testing.assert_allclose(sums, expected.sum(axis=(1, 2)), rtol=6 / np.sqrt(sums.min()))


def test_simulation_is_deterministic_from_the_seed(small):
    again = simulate(preset("small"), seed=11)
    np.testing.assert_array_equal(again.frames, small.frames)
    np.testing.assert_array_equal(again.positions_m, small.positions_m)
    np.testing.assert_array_equal(again.object_truth, small.object_truth)
    other = simulate(preset("small"), seed=12)
    assert not np.array_equal(other.frames, small.frames)


def test_noise_free_and_progress_callback():
    calls = []
    s = simulate(preset("small").replace(noise={"dose": None}, scan={"n_positions": 40}), seed=0,
                 progress=lambda done, total: calls.append((done, total)))
    assert s.frames.dtype == np.float32 and s.metadata["noise_free"]
    assert calls and calls[-1] == (40, 40)


@pytest.mark.parametrize("kind", ["gaussian", "zone-plate"])
@pytest.mark.parametrize("scan_kind", ["raster", "spiral", "concentric"])
def test_probe_and_scan_kinds_simulate(kind, scan_kind):
    spec = preset("small").replace(probe={"kind": kind, "fwhm_px": 12.0}, scan={"kind": scan_kind, "n_positions": 12})
    s = simulate(spec, seed=1)
    assert s.frames.shape == (12, 64, 64) and np.isfinite(s.frames).all()


def test_probe_from_file_and_probe_larger_than_frame(tmp_path):
    np.save(tmp_path / "small.npy", np.ones((1, 8, 8), np.complex64))
    spec = preset("small").replace(probe={"kind": "file", "path": str(tmp_path / "small.npy")}, scan={"n_positions": 5})
    assert simulate(spec, 0).probe.shape == (2, 64, 64)  # one mode in the file → partial coherence modes added
    np.save(tmp_path / "big.npy", np.ones((128, 128), np.complex64))
    with pytest.raises(ValueError, match="larger than the detector frame"):
        simulate(spec.replace(probe={"path": str(tmp_path / "big.npy")}), 0)
    with pytest.raises(ValueError, match="larger than the detector frame"):
        simulate(preset("small").replace(probe={"kind": "gaussian", "fwhm_px": 80.0}), 0)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match="siemens-star.*small"):
        preset("nope")
    assert set(PRESET_NAMES) == {"siemens-star", "ic", "cells", "texture", "small"}


@pytest.mark.parametrize("build, field", [
    (lambda: ScanSpec(overlap=1.0), "scan.overlap"),
    (lambda: ScanSpec(kind="zigzag"), "scan.kind"),
    (lambda: NoiseSpec(dose=-5), "noise.dose"),
    (lambda: NoiseSpec(background=-1), "noise.background"),
    (lambda: ProbeSpec(n_modes=0), "probe.n_modes"),
    (lambda: ProbeSpec(kind="file"), "probe.path"),
    (lambda: preset("small").replace(geometry={"frame_size": 4}), "geometry.frame_size"),
    (lambda: preset("small").replace(object={"kind": "moon"}), "object.kind"),
    (lambda: SimulationSpec.from_dict({"scan": {"overlapp": 0.5}}), "scan.overlapp"),
])
def test_spec_validation_names_the_field(build, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        build()


def test_demo_preset_geometry_matches_the_design():
    spec = preset("siemens-star")
    assert spec.geometry.frame_size == 256 and spec.geometry.object_pixel_m == pytest.approx(10e-9, rel=0.01)
    assert spec.scan.overlap == pytest.approx(0.7) and spec.scan.n_positions == 1000
    assert 2 <= spec.probe.n_modes <= 3 and spec.noise.dose == pytest.approx(1e6)


def test_demo_probe_is_50_to_60_px_and_fits_half_frame():
    s = simulate(preset("siemens-star").replace(scan={"n_positions": 20}), seed=0)
    assert 50 <= s.metadata["probe_diameter_px"] <= 60
