"""`edgeptycho simulate` → CXI → `edgeptycho evaluate`: exact scores for the truth and a known perturbation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeptycho.cli import main
from edgeptycho.io import cxi
from edgeptycho.physics.types import Reconstruction


@pytest.fixture(scope="module")
def small_scan(tmp_path_factory):
    path = tmp_path_factory.mktemp("sim") / "x.cxi"
    assert main(["simulate", "--preset", "small", "--out", str(path), "--seed", "1", "--no-progress"]) == 0
    return path


def _evaluate_json(capsys, recon, truth) -> dict:
    capsys.readouterr()
    assert main(["evaluate", str(recon), "--truth", str(truth), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_simulate_writes_a_readable_scan(small_scan, capsys):
    scan = cxi.read_scan(small_scan)
    assert scan.n_frames == 49 and scan.frame_size == 64
    assert scan.object_truth is not None and scan.probe.shape[0] == 2
    assert scan.object_pixel_m == pytest.approx(10e-9, rel=0.01)
    assert scan.metadata["seed"] == 1 and scan.metadata["preset"] == "small"
    assert scan.frames.sum() > 0


def test_simulate_prints_a_summary(tmp_path, capsys):
    assert main(["simulate", "--preset", "small", "--positions", "9", "--dose", "1e4", "--out",
                 str(tmp_path / "s.cxi"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "9 frames" in out and "nm/px" in out and "1e+04 photons" in out and "MB" in out
    assert cxi.read_scan(tmp_path / "s.cxi").metadata["spec"]["noise"]["dose"] == 1e4


def test_truth_scores_zero(small_scan, capsys):
    result = _evaluate_json(capsys, small_scan, small_scan)
    assert result["complex_nrmse"] == pytest.approx(0.0, abs=1e-6)
    assert result["phase_nrmse"] == pytest.approx(0.0, abs=1e-6)


def test_readable_table(small_scan, capsys):
    capsys.readouterr()
    assert main(["evaluate", str(small_scan), "--truth", str(small_scan)]) == 0
    out = capsys.readouterr().out
    assert "phase_nrmse" in out and "ground truth" in out


def test_perturbed_truth_scores_what_numpy_says(small_scan, tmp_path, capsys):
    from edgeptycho.physics.metrics import illuminated_mask

    scan = cxi.read_scan(small_scan)
    truth = scan.object_truth
    rng = np.random.default_rng(7)
    noise = rng.normal(0, 0.2, truth.shape)
    # a global phase offset and amplitude scale, which both metrics must ignore, plus known phase noise
    recon_obj = (1.7 * np.exp(1j * (noise + 0.9)) * truth).astype(np.complex64)
    recon = Reconstruction(object=recon_obj, pixel_m=scan.object_pixel_m, positions_m=scan.positions_m)
    cxi.write_reconstruction(tmp_path / "r.cxi", recon)
    result = _evaluate_json(capsys, tmp_path / "r.cxi", small_scan)

    region = illuminated_mask(truth.shape, scan.probe, scan.positions_px())
    x, ref = recon_obj[region].astype(np.complex128), truth[region].astype(np.complex128)
    c = np.vdot(x, ref) / np.vdot(x, x)                       # argmin_c ‖c·x − ref‖
    complex_nrmse = np.linalg.norm(c * x - ref) / np.linalg.norm(ref)
    d = np.angle(x) - np.angle(ref)
    d = np.angle(np.exp(1j * (d - np.angle(np.mean(np.exp(1j * d))))))
    phase_ref = np.angle(ref)
    phase_nrmse = np.sqrt(np.mean(d**2)) / (phase_ref.max() - phase_ref.min())
    assert complex_nrmse > 0.1 and phase_nrmse > 0.02      # the perturbation is visible
    assert result["complex_nrmse"] == pytest.approx(complex_nrmse, rel=1e-4)
    assert result["phase_nrmse"] == pytest.approx(phase_nrmse, rel=1e-4)


def test_bad_config_key_is_named(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("preset: small\nscan:\n  n_positionz: 3\n")
    assert main(["simulate", "--config", str(cfg), "--out", str(tmp_path / "y.cxi")]) == 1
    err = capsys.readouterr().err
    assert "scan.n_positionz" in err and "n_positions" in err
    assert not (tmp_path / "y.cxi").exists()


def test_yaml_preset_with_overrides_and_seed(tmp_path):
    cfg = tmp_path / "ok.yaml"
    cfg.write_text("preset: small\nseed: 5\nscan:\n  n_positions: 4\nobject:\n  kind: texture\n")
    assert main(["simulate", "--config", str(cfg), "--out", str(tmp_path / "y.cxi"), "--no-progress"]) == 0
    scan = cxi.read_scan(tmp_path / "y.cxi")
    assert scan.n_frames == 4 and scan.metadata["seed"] == 5
    assert scan.metadata["spec"]["object"]["kind"] == "texture"
    assert scan.metadata["spec"]["geometry"]["frame_size"] == 64  # the rest comes from the preset


def test_unknown_preset_is_a_clear_error(tmp_path, capsys):
    assert main(["simulate", "--preset", "nope", "--out", str(tmp_path / "y.cxi")]) == 1
    err = capsys.readouterr().err
    assert "unknown preset 'nope'" in err and "small" in err


def test_evaluate_without_truth_says_so(tmp_path, small_scan, capsys):
    scan = cxi.read_scan(small_scan)
    scan.object_truth = None
    cxi.write_scan(tmp_path / "nt.cxi", scan)
    assert main(["evaluate", str(small_scan), "--truth", str(tmp_path / "nt.cxi")]) == 1
    assert "no ground truth at entry_1/sample_1/object_truth" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".h5", ".npz"])
def test_evaluate_reads_ptychodus_products(small_scan, tmp_path, capsys, suffix):
    from edgeptycho.io import ptychodus

    scan = cxi.read_scan(small_scan)
    truth = cxi.read_reconstruction(small_scan, allow_truth=True)
    truth.origin_m = (-3 * truth.pixel_m, 2 * truth.pixel_m)  # a shifted grid must be placed by its origin
    truth.object = np.roll(truth.object, (3, -2), axis=(0, 1))
    path = ptychodus.write_product(tmp_path / f"p{suffix}", truth, energy_J=scan.energy_J,
                                   distance_m=scan.distance_m)
    result = _evaluate_json(capsys, path, small_scan)
    assert result["complex_nrmse"] < 1e-3
