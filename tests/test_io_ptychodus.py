"""ptychodus product files: HDF5 and NPZ layouts read into a Reconstruction with the right geometry.

No ptychodus install exists here: the fixtures are written by hand from the layout in ptychodus'
h5_product_file.py / npz_product_file.py (see edgeptycho/io/ptychodus.py), plus our own writer.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from edgeptycho.io import ptychodus
from edgeptycho.physics.fourier import EV
from edgeptycho.physics.types import Reconstruction


def _hand_written_h5(path, layers=1):
    rng = np.random.default_rng(0)
    obj = np.exp(1j * rng.uniform(-1, 1, (layers, 20, 30))).astype(np.complex64)
    probe = rng.normal(size=(2, 3, 8, 8)).astype(np.complex64)  # OPR × modes × H × W
    with h5py.File(path, "w") as f:
        f.attrs.update({"name": "scan42", "comments": "hand-written", "detector_object_distance_m": 2.5,
                        "probe_energy_eV": 10000.0, "probe_photon_count": 1e9, "exposure_time_s": 0.01,
                        "mass_attenuation_m2_kg": 0.0, "tomography_angle_deg": 0.0})
        f["probe_position_indexes"] = np.arange(4)
        f["probe_position_x_m"] = [0.0, 1e-7, 2e-7, 3e-7]
        f["probe_position_y_m"] = [5e-8, 5e-8, 6e-8, 6e-8]
        f["probe"] = probe
        f["probe"].attrs.update({"pixel_width_m": 1e-8, "pixel_height_m": 1e-8})
        f["object"] = obj
        f["object"].attrs.update({"center_x_m": 1.5e-7, "center_y_m": 5.5e-8,
                                  "pixel_width_m": 1e-8, "pixel_height_m": 1e-8})
        f["object_layer_spacing_m"] = np.full(layers - 1, 1e-6)
        f["costs"] = [3.0, 2.0, 1.0]  # older files name the loss history 'costs'
    return obj, probe


def test_read_hand_written_h5_product(tmp_path):
    obj, probe = _hand_written_h5(tmp_path / "product-out.h5")
    recon = ptychodus.read_product(tmp_path / "product-out.h5")
    np.testing.assert_array_equal(recon.object, obj[0])
    assert recon.pixel_m == 1e-8
    # ptychodus: pixel (r, c) sits at centre + dx·((r, c) − (H, W)/2)
    assert recon.origin_m == pytest.approx((5.5e-8 - 10 * 1e-8, 1.5e-7 - 15 * 1e-8))
    np.testing.assert_allclose(recon.positions_m, [[5e-8, 0.0], [5e-8, 1e-7], [6e-8, 2e-7], [6e-8, 3e-7]])
    np.testing.assert_array_equal(recon.probe, probe[0])
    np.testing.assert_array_equal(recon.convergence, [3.0, 2.0, 1.0])
    assert recon.program["program"] == "ptychodus" and recon.program["name"] == "scan42"
    meta = ptychodus.product_metadata(tmp_path / "product-out.h5")
    assert meta["detector_object_distance_m"] == 2.5
    assert meta["probe_energy_J"] == pytest.approx(10000 * EV)


def test_multislice_object_becomes_product_of_layers(tmp_path):
    obj, _ = _hand_written_h5(tmp_path / "ms.h5", layers=2)
    np.testing.assert_allclose(ptychodus.read_product(tmp_path / "ms.h5").object, obj[0] * obj[1], rtol=1e-6)


@pytest.mark.parametrize("suffix", [".h5", ".npz"])
def test_write_then_read_round_trip(tmp_path, suffix):
    rng = np.random.default_rng(1)
    recon = Reconstruction(object=np.exp(1j * rng.uniform(-2, 2, (16, 24))).astype(np.complex64), pixel_m=2e-8,
                           positions_m=rng.uniform(0, 3e-7, (9, 2)), probe=rng.normal(size=(2, 8, 8)).astype(
                               np.complex64), origin_m=(-1e-7, 4e-8), convergence=np.array([1.0, 0.5]))
    path = ptychodus.write_product(tmp_path / f"p{suffix}", recon, energy_J=9000 * EV, distance_m=3.0)
    back = ptychodus.read_product(path)
    np.testing.assert_array_equal(back.object, recon.object)
    np.testing.assert_array_equal(back.probe, recon.probe)
    np.testing.assert_allclose(back.positions_m, recon.positions_m)
    assert back.origin_m == pytest.approx(recon.origin_m, abs=1e-20)
    np.testing.assert_array_equal(back.convergence, [1.0, 0.5])
    assert ptychodus.product_metadata(path)["probe_energy_eV"] == pytest.approx(9000)


def test_npz_uses_ptychodus_flat_keys(tmp_path):
    recon = Reconstruction(object=np.ones((4, 4), np.complex64), pixel_m=1e-8, positions_m=np.zeros((1, 2)))
    path = ptychodus.write_product(tmp_path / "p.npz", recon, energy_J=8000 * EV, distance_m=2.0)
    with np.load(path) as z:
        for key in ("probe_pixel_width_m", "object_center_x_m", "object_pixel_height_m", "probe_position_x_m",
                    "probe_energy_eV", "detector_object_distance_m", "loss_values", "object_layer_spacing_m"):
            assert key in z.files, key
        assert z["object"].shape == (1, 4, 4) and z["probe"].ndim == 4


def test_bad_product_files_say_why(tmp_path):
    (tmp_path / "x.txt").write_text("object")
    with pytest.raises(ValueError, match=r"\.h5, \.hdf5 or \.npz"):
        ptychodus.read_product(tmp_path / "x.txt")
    with pytest.raises(FileNotFoundError):
        ptychodus.read_product(tmp_path / "missing.h5")
    np.savez(tmp_path / "x.npz", probe=np.ones((1, 1, 2, 2)))
    with pytest.raises(ValueError, match="no 'object' array"):
        ptychodus.read_product(tmp_path / "x.npz")
