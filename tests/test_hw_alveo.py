"""Alveo backend against fake xir/vart/pyxrt: DPU subgraph selection, fix_point I/O, DPU batch, CPU heads."""

from __future__ import annotations

import shutil

import numpy as np
import onnxruntime as ort
import pytest
from fakes import install_vitis

from edgeptycho.hw import open_backend
from edgeptycho.quantization.qdq import pow2_fix_point, quantize_pow2, synthetic_patterns
from edgeptycho.tools.hil import agreement


@pytest.fixture
def card(monkeypatch, tmp_path, tiny_onnx):
    """A fake U250: Vitis modules, firmware present, and a compiled-model pair model.onnx + model.xmodel."""
    vitis = install_vitis(monkeypatch)
    xclbin = tmp_path / "dpu.xclbin"
    xclbin.write_bytes(b"x")
    monkeypatch.setenv("XLNX_VART_FIRMWARE", str(xclbin))
    model = tmp_path / "model.onnx"
    shutil.copy(tiny_onnx.path, model)
    cal = synthetic_patterns(32, tiny_onnx.input_size, seed=7)
    body = ort.InferenceSession(str(tiny_onnx.body), providers=["CPUExecutionProvider"])
    logits = body.run(None, {"diffraction": cal})
    fix_out = {o.name: pow2_fix_point(np.abs(v).max()) for o, v in zip(body.get_outputs(), logits, strict=True)}

    def compile_(dtype="xint8", dpu_subgraphs=1, xmodel=None):
        return vitis.write_xmodel(xmodel or model.with_suffix(".xmodel"), tiny_onnx.body,
                                  pow2_fix_point(np.abs(cal).max()), fix_out,
                                  batch=4, dtype=dtype, dpu_subgraphs=dpu_subgraphs)

    compile_()
    return model, compile_


@pytest.mark.parametrize("batch", [4, 6])
def test_agrees_with_cpu_within_int8_tolerance(card, batch, tiny_inputs, tiny_reference):
    model, _ = card
    with open_backend("alveo", model, batch) as b:
        assert b.dpu_batch == 4 and b.jobs == -(-batch // 4)
        assert b.input_spec.dtype == np.int8 and b.input_spec.scale == 2.0**-b.input_spec.fix_point
        out = b.infer(tiny_inputs)  # float32 in: quantised half-up like the DPU, 10 frames incl. partial jobs
    report = agreement(tiny_reference, out, "int8")
    assert all(r["ok"] for r in report.values()), report


def test_int8_ring_slot_and_partial_batch(card, tiny_inputs, tiny_reference):
    model, _ = card
    with open_backend("alveo", model.with_suffix(".xmodel"), 8) as b:
        fp = b.input_spec.fix_point
        batch = np.zeros(b.input_spec.shape, np.int8)
        quantize_pow2(tiny_inputs[:5], fp, out=batch[:5])
        outputs = b.new_outputs()
        for arr in outputs.values():
            arr.fill(np.nan)
        ticket = b.submit(batch, outputs, n=5)
        assert len(ticket.extra["jobs"]) == 2  # a full job read in place + one padded job
        assert ticket.extra["jobs"][0][3].base is not None  # the first job is a view of the caller's batch
        got = b.wait(ticket)
        assert np.isnan(got["phase"][5:]).all()
        float_path = b.infer(tiny_inputs[:5])
    for k in got:
        np.testing.assert_array_equal(got[k][:5], float_path[k])
    assert agreement({k: v[:5] for k, v in tiny_reference.items()}, float_path, "int8")["phase"]["ok"]


def test_float32_dpu_tensors_rt_engine_style(card, tiny_inputs, tiny_reference):
    model, compile_ = card
    compile_(dtype="float32")
    with open_backend("alveo", model, 4) as b:
        assert b.input_spec.dtype == np.float32 and b.input_spec.fix_point is None
        out = b.infer(tiny_inputs)
    for k in out:  # no quantisation anywhere: the body and heads match the FP32 model
        np.testing.assert_allclose(out[k], tiny_reference[k], rtol=1e-5, atol=1e-5)


def test_split_graph_is_refused(card):
    model, compile_ = card
    compile_(dpu_subgraphs=2)
    with pytest.raises(ValueError, match="2 DPU subgraphs.*expected exactly one"):
        open_backend("alveo", model, 4)


def test_heads_without_onnx_need_an_option(card, tmp_path, tiny_inputs, tiny_reference):
    model, compile_ = card
    lone = compile_(xmodel=tmp_path / "lone.xmodel")
    with pytest.raises(ValueError, match="heads run on the CPU"):
        open_backend("alveo", lone, 4)
    with open_backend("alveo", lone, 4, heads={"amplitude": "softplus", "phase": "pi_tanh"}) as b:
        out = b.infer(tiny_inputs)
    assert agreement(tiny_reference, out, "int8")["amplitude"]["ok"]
    uncompiled = tmp_path / "uncompiled.onnx"
    shutil.copy(model, uncompiled)
    with pytest.raises(FileNotFoundError, match="no compiled xmodel.*vai_c_xir"):
        open_backend("alveo", uncompiled, 4)


def test_telemetry_from_pyxrt(card):
    model, _ = card
    with open_backend("alveo", model, 4) as b:
        tel = b.telemetry()
    assert tel["source"] == "pyxrt" and tel["power_w"] == 24.5 and tel["power_max_w"] == 225.0
    assert tel["temperature_c"] == {"fpga0": 41.0}
