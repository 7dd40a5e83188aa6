"""QAT: the fake-quant network computes what the DPU computes, and `calibrate --qat` fine-tunes and re-emits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pipeline_support import tiny_artifact_path
from quant_support import patterns

from edgeptycho.model.artifact import ModelArtifact
from edgeptycho.model.export import model_from_onnx
from edgeptycho.quantization.dpu_emulator import DpuEmulator
from edgeptycho.quantization.qat import QatNet, fake_quant
from edgeptycho.quantization.schemes import quantize_model


def test_fake_quant_rounds_like_the_dpu_and_passes_gradients_inside_the_range():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 300.0, -300.0], requires_grad=True)
    y = fake_quant(x, 0)
    assert y.tolist() == [1, 2, 3, 0, -1, -2, 127, -128]
    assert fake_quant(x, 0, half_up=False).tolist()[:6] == [1, 2, 3, -1, -2, -3]
    y.sum().backward()
    assert x.grad.tolist() == [1, 1, 1, 1, 1, 1, 0, 0]  # clipped straight-through estimator


def test_qat_forward_reproduces_the_deployed_integer_model(tmp_path, tmp_path_factory):
    art = ModelArtifact.load(tiny_artifact_path(tmp_path_factory))
    dst = tmp_path / "dpu.onnx"
    r = quantize_model(art.path, dst, "dpu-pow2", patterns(32, 64, seed=2), weights="minmax")
    moved_weights = [a for a in r.adjustments if "shift_cut" in a]
    qnet = QatNet(model_from_onnx(art), [r.fix_points["activations"][t] for t in r.activations]).eval()
    x = patterns(4, 64, seed=6)
    with torch.no_grad():
        amp, phase = qnet(torch.from_numpy(x))
    emu = DpuEmulator.load(dst).run(x)
    tol = 1e-5 if not moved_weights else 0.05  # a weight fix_point moved by a DPU limit is not QAT's choice
    np.testing.assert_allclose(amp.numpy(), emu["amplitude"], atol=tol)
    np.testing.assert_allclose(phase.numpy(), emu["phase"], atol=tol * np.pi)
    with pytest.raises(ValueError, match="fix_points given"):
        QatNet(model_from_onnx(art), [4] * 5)(torch.from_numpy(x))


@pytest.mark.slow
def test_calibrate_with_qat_fine_tunes_and_records_it(tmp_path, tmp_path_factory):
    from edgeptycho.cli import main
    from edgeptycho.hw import open_backend
    from edgeptycho.model.dataset import generate

    data = tmp_path / "data"
    generate("tiny", 512, data, seed=5, shard_size=256, workers=1, progress=False)
    out = tmp_path / "tiny.qat.onnx"
    assert main(["calibrate", "--model", str(tiny_artifact_path(tmp_path_factory)), "--data", "sim:cells:2",
                 "--n", "32", "--scheme", "dpu-pow2", "--qat", str(data), "--qat-steps", "10",
                 "--out", str(out), "--no-progress"]) == 0
    art = ModelArtifact.load(out)
    qat = art.metadata["quantization"]["qat"]
    assert qat["steps"] == 10 and np.isfinite(qat["val_fake_quant_after"]["loss"])
    assert (tmp_path / "tiny.qat.qat-fp32.onnx").is_file()
    with open_backend("alveo-emu", out, 4) as b:
        assert np.isfinite(b.infer(patterns(4, 64))["phase"]).all()
