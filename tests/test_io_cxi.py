"""CXI 1.6 scans and reconstructions: round trips, standard paths, foreign layouts, clear errors."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from edgeptycho.io import cxi
from edgeptycho.physics.fourier import EV
from edgeptycho.physics.types import Reconstruction, ScanData


def make_scan(n=6, size=16, modes=2, truth=True, mask=True, probe=True, dtype=np.float32) -> ScanData:
    rng = np.random.default_rng(0)
    frames = rng.poisson(50, (n, size, size)).astype(dtype)
    positions = rng.uniform(1e-7, 5e-7, (n, 2))
    m = np.zeros((size, size), np.uint32)
    m[3, 5] = 1
    pr = (rng.normal(size=(modes, size, size)) + 1j * rng.normal(size=(modes, size, size))).astype(np.complex64)
    obj = np.exp(1j * rng.uniform(-1, 1, (40, 48))).astype(np.complex64)
    return ScanData(frames=frames, positions_m=positions, energy_J=8000 * EV, distance_m=2.0,
                    detector_pixel_m=75e-6, mask=m if mask else None, probe=pr if probe else None,
                    object_truth=obj if truth else None,
                    metadata={"preset": "unit", "seed": np.int64(3), "dose": 1e6, "nested": {"a": [1, 2]}})


def test_scan_round_trip_keeps_every_field(tmp_path):
    scan = make_scan()
    path = cxi.write_scan(tmp_path / "s.cxi", scan)
    back = cxi.read_scan(path)
    np.testing.assert_array_equal(back.frames, scan.frames)
    assert back.frames.dtype == scan.frames.dtype
    np.testing.assert_allclose(back.positions_m, scan.positions_m, rtol=0, atol=0)
    assert back.energy_J == pytest.approx(scan.energy_J, rel=1e-12)
    assert back.distance_m == 2.0 and back.detector_pixel_m == 75e-6
    np.testing.assert_array_equal(back.mask, scan.mask)
    assert back.mask.dtype == np.uint32
    assert back.probe.shape == (2, 16, 16)
    np.testing.assert_array_equal(back.probe, scan.probe)
    np.testing.assert_array_equal(back.object_truth, scan.object_truth)
    assert back.metadata == {"preset": "unit", "seed": 3, "dose": 1e6, "nested": {"a": [1, 2]}}
    assert back.object_pixel_m == pytest.approx(scan.object_pixel_m)


def test_standard_cxi_paths_hold_si_values(tmp_path):
    scan = make_scan()
    path = cxi.write_scan(tmp_path / "s.cxi", scan)
    with h5py.File(path, "r") as f:
        assert f["cxi_version"][()] == 160
        np.testing.assert_array_equal(f["entry_1/data_1/data"][()], scan.frames)
        assert f["entry_1/instrument_1/detector_1/data"].chunks == (1, 16, 16)
        assert f["entry_1/data_1/data"].attrs["axes"] == "translation:y:x"
        assert isinstance(f["entry_1/data_1"].get("data", getlink=True), h5py.SoftLink)
        assert isinstance(f["entry_1/data_1"].get("translation", getlink=True), h5py.SoftLink)
        t = f["entry_1/sample_1/geometry_1/translation"][()]
        assert t.shape == (6, 3)
        np.testing.assert_array_equal(t[:, 0], scan.positions_m[:, 1])  # x = column
        np.testing.assert_array_equal(t[:, 1], scan.positions_m[:, 0])  # y = row
        np.testing.assert_array_equal(t[:, 2], 0.0)
        assert f["entry_1/sample_1/geometry_1/translation"].attrs["units"] == "m"
        det = f["entry_1/instrument_1/detector_1"]
        assert det["distance"][()] == 2.0 and det["x_pixel_size"][()] == 75e-6
        assert det["mask"].dtype == np.uint32 and det["mask"][3, 5] & 0x1
        energy = f["entry_1/instrument_1/source_1/energy"]
        assert energy[()] == pytest.approx(8000 * 1.602176634e-19) and energy.attrs["units"] == "J"
        assert np.iscomplexobj(f["entry_1/instrument_1/source_1/illumination"][()])
        np.testing.assert_array_equal(f["entry_1/image_truth/data"][()], scan.object_truth)
        assert f["entry_1/image_truth/image_size"][()][0] == pytest.approx(48 * scan.object_pixel_m)
        assert f["entry_1/sample_1/object_truth"].attrs["x_pixel_size"] == pytest.approx(scan.object_pixel_m)


@pytest.mark.parametrize("compression", ["gzip", "lz4", "bslz4", None])
def test_compression_options_round_trip(tmp_path, compression):
    scan = make_scan(dtype=np.uint32, truth=False)
    path = cxi.write_scan(tmp_path / "c.cxi", scan, compression=compression)
    np.testing.assert_array_equal(cxi.read_scan(path).frames, scan.frames)
    with h5py.File(path, "r") as f:
        plist = f["entry_1/instrument_1/detector_1/data"].id.get_create_plist()
        filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
    expected = {"gzip": 1, "lz4": 32004, "bslz4": 32008, None: None}[compression]
    assert (expected in filters) if expected else not filters


def test_unknown_compression_is_named(tmp_path):
    with pytest.raises(ValueError, match="zstdx"):
        cxi.write_scan(tmp_path / "c.cxi", make_scan(), compression="zstdx")


def _foreign(path, *, data_under="detector", translation_under="sample", energy_ev=False):
    """A minimal CXI file as another program might write it (no mask, probe, truth, y_pixel_size)."""
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 100, (5, 8, 8)).astype(np.uint16)
    xyz = np.column_stack([np.arange(5) * 1e-7, np.arange(5) * 2e-7, np.zeros(5)])
    with h5py.File(path, "w") as f:
        f["cxi_version"] = 160
        det = f.create_group("entry_1/instrument_1/detector_1")
        det["distance"] = 1.5
        det["x_pixel_size"] = 55e-6
        src = f.create_group("entry_1/instrument_1/source_1")
        if energy_ev:
            src["energy"] = 6200.0
            src["energy"].attrs["units"] = "eV"
        else:
            src["energy"] = 6200.0 * EV
        (det if data_under == "detector" else f.create_group("entry_1/data_1"))["data"] = frames
        where = "entry_1/sample_1/geometry_1" if translation_under == "sample" else "entry_1/data_1"
        f.require_group(where)["translation"] = xyz
    return frames, xyz


@pytest.mark.parametrize("data_under,translation_under", [("data_1", "sample"), ("detector", "data_1"),
                                                          ("data_1", "data_1")])
def test_foreign_layouts_read(tmp_path, data_under, translation_under):
    frames, xyz = _foreign(tmp_path / "f.cxi", data_under=data_under, translation_under=translation_under,
                           energy_ev=True)
    scan = cxi.read_scan(tmp_path / "f.cxi")
    np.testing.assert_array_equal(scan.frames, frames)
    np.testing.assert_allclose(scan.positions_m[:, 0], xyz[:, 1])
    np.testing.assert_allclose(scan.positions_m[:, 1], xyz[:, 0])
    assert scan.energy_J == pytest.approx(6200 * EV)
    assert scan.detector_pixel_m == 55e-6
    assert scan.mask is None and scan.probe is None and scan.object_truth is None and scan.metadata == {}


def test_wrong_layout_names_missing_paths(tmp_path):
    with h5py.File(tmp_path / "empty.cxi", "w") as f:
        f["cxi_version"] = 160
        f.create_group("entry_1/instrument_1")
    with pytest.raises(ValueError, match="no frames at entry_1/instrument_1/detector_1/data or entry_1/data_1/data"):
        cxi.read_scan(tmp_path / "empty.cxi")
    _foreign(tmp_path / "f.cxi")
    with h5py.File(tmp_path / "f.cxi", "a") as f:
        del f["entry_1/instrument_1/detector_1/distance"]
    with pytest.raises(ValueError, match="missing entry_1/instrument_1/detector_1/distance"):
        cxi.read_scan(tmp_path / "f.cxi")
    with pytest.raises(FileNotFoundError):
        cxi.read_scan(tmp_path / "nope.cxi")
    (tmp_path / "text.cxi").write_text("hello")
    with pytest.raises(ValueError, match="not an HDF5"):
        cxi.read_scan(tmp_path / "text.cxi")


def test_open_scan_keeps_frames_on_disk(tmp_path):
    scan = make_scan(n=10)
    path = cxi.write_scan(tmp_path / "s.cxi", scan, compression="bslz4")
    with cxi.open_scan(path) as s:
        assert isinstance(s.frames, h5py.Dataset)
        np.testing.assert_array_equal(s.frames[4:7], scan.frames[4:7])
        np.testing.assert_array_equal(s.positions_m, scan.positions_m)
        assert s.n_frames == 10 and s.frame_size == 16
        assert s.object_pixel_m == pytest.approx(scan.object_pixel_m)
        assert isinstance(s, ScanData) and s.mask is not None and s.probe.shape == (2, 16, 16)
        loaded = s.to_scan()
        assert isinstance(loaded.frames, np.ndarray) and not isinstance(loaded, cxi.CXIScan)
        np.testing.assert_array_equal(loaded.frames, scan.frames)


def make_recon(probe=True, uncertainty=True) -> Reconstruction:
    rng = np.random.default_rng(2)
    obj = np.exp(1j * rng.uniform(-3, 3, (30, 40))).astype(np.complex64)
    pr = rng.normal(size=(3, 8, 8)).astype(np.complex64)
    return Reconstruction(object=obj, pixel_m=1e-8, positions_m=rng.uniform(0, 3e-7, (7, 2)),
                          probe=pr if probe else None, origin_m=(-2e-8, 3e-8),
                          metrics={"phase_nrmse": 0.05, "frames": 7}, convergence=np.linspace(1, 0.1, 5),
                          uncertainty=rng.uniform(0, 0.1, (30, 40)) if uncertainty else None,
                          program={"program": "edgeptycho", "model": "tiny"})


def test_reconstruction_round_trip(tmp_path):
    recon = make_recon()
    path = cxi.write_reconstruction(tmp_path / "r.cxi", recon, scan=make_scan(), command="edgeptycho x")
    back = cxi.read_reconstruction(path)
    np.testing.assert_array_equal(back.object, recon.object)
    assert back.pixel_m == 1e-8 and back.origin_m == pytest.approx(recon.origin_m)
    np.testing.assert_allclose(back.positions_m, recon.positions_m)
    np.testing.assert_array_equal(back.probe, recon.probe)
    assert back.metrics == {"phase_nrmse": 0.05, "frames": 7}
    np.testing.assert_allclose(back.convergence, recon.convergence)
    np.testing.assert_allclose(back.uncertainty, recon.uncertainty, rtol=1e-6)
    assert back.program["program"] == "edgeptycho" and back.program["model"] == "tiny"
    assert back.program["command"] == "edgeptycho x" and back.program["date"]
    with h5py.File(path, "r") as f:
        img = f["entry_1/image_1"]
        assert img["data_type"][()] == b"object" and img["data_space"][()] == b"real"
        np.testing.assert_allclose(img["image_size"][()], [40e-8, 30e-8, 0])
        assert f["entry_1/image_2/data"].shape == (1, 3, 8, 8)
        assert f["entry_1/image_2/data"].attrs["axes"] == "coherent:incoherent:y:x"
        np.testing.assert_array_equal(f["entry_1/instrument_1/source_1/illumination"][0], recon.probe)
        assert f["entry_1/instrument_1/source_1/energy"][()] == pytest.approx(8000 * EV)


def test_minimal_reconstruction_round_trip(tmp_path):
    recon = Reconstruction(object=np.ones((5, 6), np.complex64), pixel_m=2e-8, positions_m=np.zeros((0, 2)))
    back = cxi.read_reconstruction(cxi.write_reconstruction(tmp_path / "r.cxi", recon))
    assert back.probe is None and back.uncertainty is None and back.convergence is None
    assert back.object.shape == (5, 6) and back.positions_m.shape == (0, 2)


def test_ptychodus_cxi_product_layout_reads_object_not_probe(tmp_path):
    """ptychodus' CXI writer puts the probe in image_1 and the object (layer:y:x) in image_2."""
    obj = np.exp(1j * np.linspace(-1, 1, 12 * 10)).reshape(1, 12, 10).astype(np.complex64)
    with h5py.File(tmp_path / "p.cxi", "w") as f:
        f["cxi_version"] = 160
        f["entry_1/image_1/data"] = np.ones((1, 2, 4, 4), np.complex64)
        f["entry_1/image_1/data"].attrs["axes"] = "coherent:incoherent:y:x"
        f["entry_1/image_2/data"] = obj
        f["entry_1/image_2/data"].attrs["axes"] = "layer:y:x"
        f["entry_1/image_2/data_type"] = "electron density"
        f["entry_1/image_2/image_size"] = [10 * 5e-9, 12 * 5e-9, 0.0]
        f.create_group("entry_1/instrument_1/source_1")["illumination"] = h5py.SoftLink("/entry_1/image_1/data")
        f["entry_1/sample_1/geometry_1/translation"] = [[1e-8, 2e-8, 0]]
        f["entry_1/ptychodus/object_center_x_m"] = 0.0
        f["entry_1/ptychodus/object_center_y_m"] = 0.0
        f["entry_1/process_1/program"] = "Ptychodus"
    back = cxi.read_reconstruction(tmp_path / "p.cxi")
    np.testing.assert_array_equal(back.object, obj[0])
    assert back.probe.shape == (2, 4, 4)
    assert back.pixel_m == pytest.approx(5e-9)
    assert back.origin_m == pytest.approx((-6 * 5e-9, -5 * 5e-9))
    np.testing.assert_allclose(back.positions_m, [[2e-8, 1e-8]])
    assert back.program["program"] == "Ptychodus"


def test_scan_file_as_reconstruction_only_when_asked(tmp_path):
    scan = make_scan()
    path = cxi.write_scan(tmp_path / "s.cxi", scan)
    with pytest.raises(ValueError, match="ground truth is at entry_1/sample_1/object_truth"):
        cxi.read_reconstruction(path)
    recon = cxi.read_reconstruction(path, allow_truth=True)
    np.testing.assert_array_equal(recon.object, scan.object_truth)
    assert recon.pixel_m == pytest.approx(scan.object_pixel_m)
    np.testing.assert_array_equal(recon.positions_m, scan.positions_m)
