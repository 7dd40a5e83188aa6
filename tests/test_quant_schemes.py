"""Scheme emitters: dpu-pow2 is all powers of two with int8 biases, shared concat scales and the DPU compiler's
shift limits; trt-int8 puts Q/DQ where a strongly typed TensorRT network wants them; fp16 keeps FP32 I/O;
`edgeptycho calibrate` writes a hash-checked artifact."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from pipeline_support import tiny_artifact_path
from quant_support import concat_model, patterns

from edgeptycho.quantization.graph import load_float_model
from edgeptycho.quantization.schemes import quantize_model, read_fix_points


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("schemes")
    src = concat_model(d / "concat.onnx")
    cal = patterns(48, 32, seed=1)
    out = {"src": src}
    for scheme in ("dpu-pow2", "trt-int8", "fp16"):
        out[scheme] = d / f"{scheme}.onnx"
        out[scheme + ":result"] = quantize_model(src, out[scheme], scheme, cal if scheme != "fp16" else None)
    return out


def graph_parts(path):
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    return model, inits, producer


def test_every_dpu_scale_is_an_exact_power_of_two_with_int8_zero_points(models):
    model, inits, _ = graph_parts(models["dpu-pow2"])
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) > 20
    for n in qdq:
        s = inits[n.input[1]]
        assert s.dtype == np.float32 and s.size == 1, n.name  # per tensor
        m, e = np.frexp(s.astype(np.float64))
        assert m == 0.5, f"{n.name}: scale {s} is not a power of two"
        z = inits[n.input[2]]
        assert z.dtype == np.int8 and z == 0
    for n in qdq:  # weights AND biases are int8 constants at their own pow2 scale
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            assert inits[n.input[0]].dtype == np.int8
    convs = [n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    dq_out = {n.output[0]: n for n in qdq if n.op_type == "DequantizeLinear"}
    assert all(len(c.input) == 3 and c.input[2] in dq_out and dq_out[c.input[2]].input[0] in inits for c in convs)


def test_concat_inputs_and_output_share_one_scale(models):
    model, inits, producer = graph_parts(models["dpu-pow2"])
    concats = [n for n in model.graph.node if n.op_type == "Concat"]
    assert concats
    for c in concats:
        scales = {float(inits[producer[i].input[1]]) for i in c.input}  # each input is a DequantizeLinear
        q_after = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == c.output[0]]
        scales.add(float(inits[q_after[0].input[1]]))
        assert len(scales) == 1, scales
    fps = models["dpu-pow2:result"].fix_points["activations"]
    assert models["dpu-pow2:result"].adjustments, "the random branches had different ranges: one must move"
    assert any("concat" in a for a in models["dpu-pow2:result"].adjustments)
    stored = read_fix_points(onnx.load(str(models["dpu-pow2"])))
    decided = models["dpu-pow2:result"].fix_points
    assert stored == {**fps, **decided["weights"], **decided["biases"]}  # the model holds what was decided


def test_dpu_fix_points_satisfy_the_compiler_shift_limits(models):
    from edgeptycho.quantization.dpu_emulator import DpuEmulator

    emu = DpuEmulator.load(models["dpu-pow2"])
    for op in emu.ops:
        fps = [emu.fps[t] for t in op.inputs]
        if op.w is not None:
            sc = fps[0] + op.fp_w - op.fp_out
            sb = fps[0] + op.fp_w - op.fp_b
            assert 0 <= sc <= 16 and min(0, sc - 16) <= sb <= 15, op.name
        elif op.kind == "add":
            assert max(fps) - min(fps) <= 7 and -7 <= min(fps) - op.fp_out <= 25
        elif op.kind == "resize":
            assert fps[0] == op.fp_out


def test_dpu_heads_stay_float_after_dequantisation(models):
    model, _, producer = graph_parts(models["dpu-pow2"])
    for n in model.graph.node:
        if n.op_type in ("Tanh", "Softplus"):
            assert producer[n.input[0]].op_type == "DequantizeLinear"


def test_trt_int8_places_qdq_on_conv_inputs_and_per_channel_weights(models):
    model, inits, producer = graph_parts(models["trt-int8"])
    for c in (n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")):
        x, w = producer[c.input[0]], producer[c.input[1]]
        assert x.op_type == "DequantizeLinear" and producer[x.input[0]].op_type == "QuantizeLinear"
        assert w.op_type == "DequantizeLinear" and inits[w.input[0]].dtype == np.int8
        axis = next(a.i for a in w.attribute if a.name == "axis")
        out_channels = inits[w.input[0]].shape[0 if c.op_type == "Conv" else 1]
        assert axis == (0 if c.op_type == "Conv" else 1) and inits[w.input[1]].shape == (out_channels,)
        assert inits[c.input[2]].dtype == np.float32  # bias float: TensorRT fuses it
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert np.all(inits[n.input[2]] == 0) and inits[n.input[2]].dtype == np.int8
    # the residual add reads its skip input through the same Q/DQ pair as the conv that reads it
    add = next(n for n in model.graph.node if n.op_type == "Add")
    skip = [i for i in add.input if producer[i].op_type == "DequantizeLinear"]
    assert len(skip) == 1
    readers = [n for n in model.graph.node if skip[0] in n.input]
    assert {n.op_type for n in readers} == {"Add", "Conv"}
    # no Q/DQ inside the float heads, none on non-conv outputs
    assert not any(n.op_type == "QuantizeLinear" and producer.get(n.input[0]) is not None
                   and producer[n.input[0]].op_type in ("Tanh", "Softplus", "Mul", "Add") for n in model.graph.node)


def test_fp16_keeps_float32_io_and_halves_every_weight(models):
    model = onnx.load(str(models["fp16"]))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in model.graph.output)
    assert {numpy_helper.to_array(t).dtype for t in model.graph.initializer if t.dims} == {np.dtype(np.float16)}


def test_unsupported_body_op_is_named(tmp_path):
    from onnx import helper

    g = helper.make_graph(
        [helper.make_node("Conv", ["diffraction", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Sigmoid", ["c"], ["s"], name="mid_sigmoid"),
         helper.make_node("Conv", ["s", "w2"], ["amplitude"], name="out")],
        "g", [helper.make_tensor_value_info("diffraction", onnx.TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("amplitude", onnx.TensorProto.FLOAT, [1, 1, 8, 8])],
        [numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32), "w"),
         numpy_helper.from_array(np.ones((1, 2, 3, 3), np.float32), "w2")])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(ValueError, match="mid_sigmoid"):
        quantize_model(path, tmp_path / "out.onnx", "dpu-pow2", np.ones((2, 1, 8, 8), np.float32))


def test_exporter_shared_initializers_are_unshared(tmp_path_factory):
    model = load_float_model(tiny_artifact_path(tmp_path_factory))
    assert not any(n.op_type in ("Identity", "Constant") for n in model.graph.node)
    names = [t.name for t in model.graph.initializer]
    assert len(names) == len(set(names))


def test_calibrate_command_writes_a_hash_checked_artifact(tmp_path, tmp_path_factory, capsys):
    from edgeptycho.cli import main
    from edgeptycho.io.cxi import write_scan
    from edgeptycho.model.artifact import ModelArtifact
    from edgeptycho.physics.simulate import preset, simulate

    model = tiny_artifact_path(tmp_path_factory)
    scan_path = write_scan(tmp_path / "scan.cxi", simulate(preset("small").replace(scan={"n_positions": 30}), 3))
    out = tmp_path / "tiny.int8.onnx"
    assert main(["calibrate", "--model", str(model), "--data", str(scan_path), "--n", "20", "--scheme",
                 "dpu-pow2", "--observer", "percentile", "--out", str(out), "--no-progress"]) == 0
    assert "alveo-emu" in capsys.readouterr().out
    art = ModelArtifact.load(out)  # the hash check passes
    q = art.metadata["quantization"]
    assert q["scheme"] == "dpu-pow2" and q["observer"] == "percentile" and q["calibration"]["n"] == 20
    assert q["calibration"]["path"] == str(scan_path) and len(q["calibration"]["file_sha256"]) == 64
    assert art.metadata["parent"]["sha256"] == ModelArtifact.load(model).sha256
    assert art.preprocess == ModelArtifact.load(model).preprocess
    fps = q["fix_points"]
    assert set(fps) == {"activations", "weights", "biases"} and "diffraction" in fps["activations"]
    assert json.loads(out.with_suffix(".json").read_text())["sha256"] == art.sha256
    out.write_bytes(out.read_bytes() + b" ")  # a tampered model file no longer matches its sidecar
    with pytest.raises(ValueError, match="sha256"):
        ModelArtifact.load(out)


def test_calibrate_rejects_bad_calibration_sources(tmp_path, tmp_path_factory):
    from edgeptycho.io.cxi import write_scan
    from edgeptycho.physics.types import ScanData
    from edgeptycho.quantization.schemes import calibrate_artifact

    model = tiny_artifact_path(tmp_path_factory)
    wrong = write_scan(tmp_path / "big.cxi", ScanData(np.ones((3, 128, 128), np.float32), np.zeros((3, 2)),
                                                      1.6e-15, 1.0, 75e-6))
    with pytest.raises(ValueError, match="64-px frames"):
        calibrate_artifact(model, "trt-int8", tmp_path / "x.onnx", wrong)
    with pytest.raises(ValueError, match="sim:KIND"):
        calibrate_artifact(model, "trt-int8", tmp_path / "x.onnx", "sim:siemens-star:1:extra")
    with pytest.raises(ValueError, match="needs calibration data"):
        calibrate_artifact(model, "trt-int8", tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="overwrite"):
        calibrate_artifact(model, "fp16", model)
