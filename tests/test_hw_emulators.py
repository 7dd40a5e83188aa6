"""jetson-emu and alveo-emu: target numerics within tolerance of CPU FP32, derived-model cache, DPU int8 I/O."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgeptycho.hw import open_backend
from edgeptycho.quantization.qdq import (
    dequantize_pow2,
    derive_model,
    quantize_pow2,
    split_heads,
)
from edgeptycho.tools.hil import TOLERANCES, agreement


@pytest.mark.parametrize("name, precision", [("jetson-emu", "fp16"), ("jetson-emu", "int8"),
                                             ("alveo-emu", "int8"), ("jetson-emu", "fp32")])
def test_emulator_agrees_with_cpu_fp32(name, precision, tiny_onnx, tiny_inputs, tiny_reference, tiny_calibration,
                                       hw_cache):
    with open_backend(name, tiny_onnx.path, 4, precision, calibration=tiny_calibration) as b:
        out = b.infer(tiny_inputs)
    report = agreement(tiny_reference, out, precision)
    assert all(r["ok"] for r in report.values()), report
    if precision != "fp32":  # and it is not secretly the FP32 model
        assert max(r["max"] for r in report.values()) > TOLERANCES["fp32"]["max"]


def test_synthetic_calibration_is_announced(tiny_onnx, hw_cache, caplog):
    with caplog.at_level(logging.WARNING):
        open_backend("alveo-emu", tiny_onnx.path, 4).close()
    assert any("synthetic" in r.getMessage() and "calibration" in r.getMessage() for r in caplog.records)


def test_derived_model_is_cached_by_content(tiny_onnx, tiny_calibration, hw_cache):
    first = open_backend("jetson-emu", tiny_onnx.path, 4, "int8", calibration=tiny_calibration)
    second = open_backend("jetson-emu", tiny_onnx.path, 2, "int8", calibration=tiny_calibration)
    assert first.run_path == second.run_path and first.run_path.parent == hw_cache / "qdq"
    other = open_backend("jetson-emu", tiny_onnx.path, 4, "int8", calibration=tiny_calibration[:16])
    assert other.run_path != first.run_path  # different calibration, different model
    assert len(list((hw_cache / "qdq").glob("*.onnx"))) == 2


def test_fp16_model_keeps_float32_io(tiny_onnx, hw_cache):
    with open_backend("jetson-emu", tiny_onnx.path, 4, "fp16") as b:
        model = onnx.load(str(b.run_path))
    assert {numpy_helper.to_array(t).dtype for t in model.graph.initializer if t.dims} == {np.dtype(np.float16)}
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert b.input_spec.dtype == np.float32


def test_pow2_model_scales_are_powers_of_two_and_heads_stay_float(tiny_onnx, tiny_calibration, tmp_path):
    model = onnx.load(str(derive_model(tiny_onnx.path, "dpu-pow2", tmp_path, tiny_calibration)))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    scales = [inits[n.input[1]] for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert scales and all(np.all(np.log2(s) == np.round(np.log2(s))) for s in scales)
    zps = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert all(np.all(z == 0) for z in zps)
    heads = {n.input[0] for n in model.graph.node if n.op_type in ("Tanh", "Softplus")}
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    assert {producers[h] for h in heads} == {"DequantizeLinear"}  # heads read the dequantised conv output
    assert not any(n.op_type == "QuantizeLinear" and producers.get(n.input[0]) in ("Tanh", "Softplus", "Mul")
                   for n in model.graph.node)


def test_alveo_emu_takes_dpu_int8_input(tiny_onnx, tiny_inputs, tiny_calibration, hw_cache):
    with open_backend("alveo-emu", tiny_onnx.path, 6, calibration=tiny_calibration) as b:
        spec = b.input_spec
        assert spec.dtype == np.int8 and spec.scale == 2.0**-spec.fix_point and b.dpu_batch == 4
        q = quantize_pow2(tiny_inputs[:5], spec.fix_point)
        batch = np.zeros(spec.shape, np.int8)
        batch[:5] = q
        outputs = b.new_outputs()
        ticket = b.submit(batch, outputs, n=5)
        from_int8 = {k: v[:5].copy() for k, v in b.wait(ticket).items()}
        assert ticket.extra["dpu_jobs"] == 2  # 5 frames = one full DPU job + one padded
        from_float = b.infer(tiny_inputs[:5])
        roundtrip = b.infer(dequantize_pow2(q, spec.fix_point))
    for k in from_int8:
        np.testing.assert_array_equal(from_int8[k], from_float[k])
        np.testing.assert_array_equal(from_int8[k], roundtrip[k])


def test_dpu_rounding_is_half_up_and_saturates():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 300.0, -300.0], np.float32)
    assert quantize_pow2(x, 0).tolist() == [1, 2, 3, 0, -1, -2, 127, -128]
    assert quantize_pow2(np.float32([0.25, -0.75]), 2).tolist() == [1, -3]
    np.testing.assert_array_equal(dequantize_pow2(np.int8([4, -128]), 3), np.float32([0.5, -16.0]))


def test_split_heads_finds_the_cpu_tail(tiny_onnx, tiny_inputs, tiny_reference):
    import onnxruntime as ort

    heads = split_heads(onnx.load(str(tiny_onnx.path)))
    assert [op for op, _, _ in heads["amplitude"].ops] == ["Softplus"]
    assert [op for op, _, _ in heads["phase"].ops] == ["Tanh", "Mul"]
    body = ort.InferenceSession(str(tiny_onnx.body), providers=["CPUExecutionProvider"])
    logits = dict(zip(("amplitude", "phase"), body.run(None, {"diffraction": tiny_inputs}), strict=True))
    for name, head in heads.items():
        np.testing.assert_allclose(head.apply(logits[name]), tiny_reference[name], rtol=1e-5, atol=1e-6)


def test_hil_tool_reports_agreement(tiny_onnx, hw_cache, capsys):
    from edgeptycho.tools.hil import main

    assert main(["--backend", "jetson-emu", "--precision", "fp16", "--model", str(tiny_onnx.path),
                 "--batch", "4", "--frames", "8", "--batches", "4"]) == 0
    out = capsys.readouterr().out
    assert "amplitude" in out and "ok" in out and "frames/s" in out and "p99" in out
    assert main(["--backend", "jetson", "--model", str(tiny_onnx.path)]) in (0, 2)
