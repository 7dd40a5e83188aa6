"""ONNX export: dynamic batch, ONNX Runtime matches PyTorch, weights rebuilt from ONNX, hash-checked artifacts."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgeptycho.model.artifact import ModelArtifact, ModelHashMismatch
from edgeptycho.model.export import EXPORT_TOLERANCE, check_onnx, export_onnx, model_from_onnx
from edgeptycho.model.network import build_network, load_preset


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(1)
    model = build_network(load_preset("tiny").network).eval()
    for p in model.parameters():  # leave the identity initialisation: every weight must matter
        p.data.normal_(0, 0.1)
    return model


def test_round_trip_dynamic_batch(tmp_path, tiny_model):
    path = export_onnx(tiny_model, tmp_path / "t.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["diffraction"]
    assert [o.name for o in sess.get_outputs()] == ["amplitude", "phase"]
    assert not isinstance(sess.get_inputs()[0].shape[0], int)  # dynamic batch
    for b in (1, 5):
        x = np.random.default_rng(b).random((b, 1, 64, 64), dtype=np.float32) * 2
        amp, ph = sess.run(None, {"diffraction": x})
        with torch.no_grad():
            ra, rp = tiny_model(torch.from_numpy(x))
        assert amp.shape == ph.shape == (b, 1, 32, 32)
        assert np.abs(amp - ra.numpy()).max() <= EXPORT_TOLERANCE
        assert np.abs(ph - rp.numpy()).max() <= EXPORT_TOLERANCE
    assert check_onnx(tiny_model, path, batches=(1, 5)) <= EXPORT_TOLERANCE


def _artifact(tmp_path, model):
    from edgeptycho.model.artifact import write_artifact

    preset = load_preset("tiny")
    path = export_onnx(model, tmp_path / "m.onnx")
    return write_artifact(path, {"name": "m", "version": "test", "architecture": preset.to_dict(),
                                 "input_size": 64, "output_size": 32, "frame_size": 64,
                                 "preprocess": preset.preprocess.to_dict()})


def test_weights_rebuilt_from_onnx(tmp_path, tiny_model):
    art = _artifact(tmp_path, tiny_model)
    rebuilt = model_from_onnx(ModelArtifact.load(art.path))
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        for a, b in zip(tiny_model(x), rebuilt(x), strict=True):
            assert torch.equal(a, b)


def test_altered_onnx_is_refused(tmp_path, tiny_model):
    art = _artifact(tmp_path, tiny_model)
    ModelArtifact.load(art.path)  # intact: loads
    blob = bytearray(art.path.read_bytes())
    blob[-10] ^= 0xFF
    art.path.write_bytes(bytes(blob))
    with pytest.raises(ModelHashMismatch):
        ModelArtifact.load(art.path)


def test_shipped_models_load_and_describe_themselves():
    art = ModelArtifact.load("tiny")
    meta = art.metadata
    for key in ("architecture", "preprocess", "training", "data", "metrics", "parameters", "flops", "onnx_opset",
                "reproduce"):
        assert key in meta, key
    assert meta["metrics"]["export_max_abs_diff"] <= EXPORT_TOLERANCE
    assert art.path.stat().st_size < 10e6
    assert json.loads((art.path.parent / "aliases.json").read_text())["default"] == "cpu-default"
    assert ModelArtifact.load("default").input_size == 128
