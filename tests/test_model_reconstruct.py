"""`edgeptycho reconstruct` end to end on the `small` preset with the shipped tiny model; fine-tuning round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeptycho.cli import main
from edgeptycho.io.cxi import read_reconstruction, write_scan
from edgeptycho.model.artifact import ModelArtifact
from edgeptycho.physics.simulate import preset, simulate


@pytest.fixture(scope="module")
def small_scan(tmp_path_factory):
    path = tmp_path_factory.mktemp("recon") / "small.cxi"
    write_scan(path, simulate(preset("small"), seed=11))
    return path


def test_reconstruct_then_evaluate(tmp_path, small_scan, capsys):
    out = tmp_path / "rec.cxi"
    assert main(["reconstruct", str(small_scan), "--model", "tiny", "--batch", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for stage in ("preprocess", "infer", "stitch", "write"):
        assert stage in printed
    recon = read_reconstruction(out)
    assert recon.program["model"] == "tiny" and recon.program["model_sha256"] == ModelArtifact.load("tiny").sha256
    assert json.loads(recon.program["phase_ramp_removed_rad_per_px"]) == [0.0, 0.0]  # FP32 model: ramp kept
    assert abs(recon.pixel_m - 10.01e-9) < 0.1e-9
    assert main(["evaluate", str(out), "--truth", str(small_scan), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert np.isfinite(metrics["phase_nrmse"]) and metrics["illuminated_fraction"] > 0.9


def test_wrong_frame_size_is_refused(small_scan):
    from edgeptycho.commands.reconstruct import check_geometry

    with pytest.raises(ValueError, match="trained on 64-px frames"):
        check_geometry(ModelArtifact.load("tiny"), 256)


@pytest.mark.slow
def test_finetune_reports_heldout_error_and_exports(tmp_path):
    scan_path = tmp_path / "ft.cxi"
    write_scan(scan_path, simulate(preset("small").replace(scan={"n_positions": 256}), seed=12))
    out = tmp_path / "ft"
    assert main(["finetune", "--model", "tiny", "--scan", str(scan_path), "--truth", str(scan_path),
                 "--out", str(out), "--epochs", "2", "--holdout", "0.25"]) == 0
    report = json.loads((out / "finetune_report.json").read_text())
    assert report["n_heldout"] > 0 and report["n_train"] > 0
    assert report["export_max_abs_diff"] <= 1e-4
    art = ModelArtifact.load(out / "tiny-ft.onnx")
    assert "heldout_after_phase_rms_rad" in art.metadata["metrics"]
    assert art.metadata["training"]["base_model"] == "tiny"


@pytest.mark.slow
def test_finetune_on_an_iterative_reconstruction(tmp_path):
    """The beamline route: labels cut from an iterative reconstruction of the same scan, not from a truth."""
    scan_path = tmp_path / "ft.cxi"
    write_scan(scan_path, simulate(preset("small").replace(scan={"n_positions": 256}), seed=13))
    recon_path = tmp_path / "recon.cxi"
    assert main(["reconstruct", str(scan_path), "--model", "none", "--refine-iters", "10",
                 "--out", str(recon_path)]) == 0
    recon = read_reconstruction(recon_path)
    assert recon.program["model"] == "none"  # an iterative product: finetune must not reach for a truth
    out = tmp_path / "ft"
    assert main(["finetune", "--model", "tiny", "--scan", str(scan_path), "--truth", str(recon_path),
                 "--out", str(out), "--epochs", "1", "--holdout", "0.25"]) == 0
    report = json.loads((out / "finetune_report.json").read_text())
    assert report["n_train"] > 0 and report["n_heldout"] > 0
    assert np.isfinite(report["heldout_after"]["phase_rms_rad"])
