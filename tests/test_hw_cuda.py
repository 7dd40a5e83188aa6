"""cuda backend: the ONNX→torch interpreter reproduces ONNX Runtime; the backend's buffer logic on the CPU."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgeptycho.hw import BackendUnavailable
from edgeptycho.hw.cuda import CudaBackend, onnx_to_torch
from edgeptycho.tools.hil import agreement


def _ort(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def test_interpreter_matches_onnxruntime(tiny_onnx, tiny_inputs):
    module = onnx_to_torch(onnx.load(str(tiny_onnx.path))).eval()
    with torch.no_grad():
        got = module(torch.from_numpy(tiny_inputs))
    for g, r in zip(got, _ort(tiny_onnx.path, tiny_inputs), strict=True):
        np.testing.assert_allclose(g.numpy(), r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("upsample, amp_head", [("convtranspose", "softplus"), ("nearest-conv", "sigmoid")])
def test_interpreter_covers_the_model_family(upsample, amp_head, tmp_path):
    network = pytest.importorskip("edgeptycho.model.network")
    export = pytest.importorskip("edgeptycho.model.export")
    cfg = network.NetworkConfig(input_size=32, output_size=16, widths=[4, 4, 8, 8, 8], upsample=upsample,
                                amplitude_head=amp_head, amplitude_range=2.0)
    torch.manual_seed(1)
    path = export.export_onnx(network.build_network(cfg), tmp_path / "family.onnx")
    x = np.random.default_rng(0).random((3, 1, 32, 32), dtype=np.float32) * 2
    module = onnx_to_torch(onnx.load(str(path))).eval()
    with torch.no_grad():
        got = module(torch.from_numpy(x))
    for g, r in zip(got, _ort(path, x), strict=True):
        np.testing.assert_allclose(g.numpy(), r, rtol=1e-4, atol=1e-5)


def test_unsupported_operator_is_named(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 2, 2])
    node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2])
    with pytest.raises(ValueError, match=r"unsupported operators \['MaxPool'\]"):
        onnx_to_torch(helper.make_model(helper.make_graph([node], "g", [x], [y])))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_backend_buffers_and_partial_batches_on_cpu(precision, tiny_onnx, tiny_inputs):
    ref = dict(zip(("amplitude", "phase"), _ort(tiny_onnx.path, tiny_inputs), strict=True))
    b = CudaBackend(tiny_onnx.path, 4, precision, device="cpu")  # same code path, no streams/graphs
    try:
        out = b.infer(tiny_inputs)
        assert agreement(ref, out, precision)["phase"]["ok"]
        outputs = b.new_outputs(b.allocator())
        outputs["phase"].fill(np.nan)
        got = b.wait(b.submit(np.ascontiguousarray(tiny_inputs[:3]), outputs, n=3))
        assert got["phase"] is outputs["phase"] and np.isnan(got["phase"][3]).all()
        assert agreement({"phase": ref["phase"][:3]}, {"phase": got["phase"][:3]}, precision)["phase"]["ok"]
    finally:
        b.close()


def test_probe_without_gpu_says_how_to_get_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailable, match="sees no CUDA device") as err:
        CudaBackend.probe()
    assert "torch==2.13.0" in err.value.fix and "nvidia-smi" in err.value.fix
