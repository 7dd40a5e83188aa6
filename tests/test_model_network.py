"""The CNN family: preset sizes, output shapes, DPU-expressible body ops, FLOP counting, config errors."""

from __future__ import annotations

import dataclasses

import onnx
import pytest
import torch
from torch import nn

from edgeptycho.config import ConfigError
from edgeptycho.model.export import export_onnx
from edgeptycho.model.network import (
    NetworkConfig,
    build_network,
    count_parameters,
    flops,
    fold_batchnorm,
    load_preset,
    preset_from_dict,
    preset_names,
)

BODY_OPS = {"Conv", "Relu", "Add", "Concat", "ConvTranspose", "Resize"}
HEAD_OPS = {"Softplus", "Sigmoid", "Tanh", "Mul", "Constant", "Identity"}


def test_presets_exist_with_expected_sizes():
    assert {"paper", "cpu-default", "tiny"} <= set(preset_names())
    paper = count_parameters(load_preset("paper").network)
    assert 1.5e6 <= paper <= 2.5e6  # ≈ 2 M ± 25 %
    assert 1e4 <= count_parameters(load_preset("tiny").network) <= 1e5
    assert 5e5 <= count_parameters(load_preset("cpu-default").network) <= 5e6


@pytest.mark.parametrize("name,size_in,size_out", [("tiny", 64, 32), ("cpu-default", 128, 64), ("paper", 256, 128)])
def test_output_shapes_and_ranges(name, size_in, size_out):
    preset = load_preset(name)
    assert (preset.network.input_size, preset.network.output_size) == (size_in, size_out)
    model = build_network(preset.network).eval()
    with torch.no_grad():
        amp, phase = model(torch.rand(2, 1, size_in, size_in) * 3)
    assert amp.shape == phase.shape == (2, 1, size_out, size_out)
    assert (amp >= 0).all() and (phase.abs() <= torch.pi).all()


def test_no_maxpool_and_only_dpu_ops_in_the_body(tmp_path):
    for name in preset_names():
        model = build_network(load_preset(name).network)
        assert not any(isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) for m in model.modules()), name
    cfg = load_preset("tiny").network
    for upsample in ("convtranspose", "nearest-conv"):
        path = export_onnx(build_network(dataclasses.replace(cfg, upsample=upsample)), tmp_path / f"{upsample}.onnx")
        nodes = onnx.load(str(path)).graph.node
        ops = {n.op_type for n in nodes}
        assert "MaxPool" not in ops
        assert ops <= BODY_OPS | HEAD_OPS, ops - BODY_OPS - HEAD_OPS
        assert ("Resize" in ops) == (upsample == "nearest-conv")
        strides = [next(list(a.ints) for a in n.attribute if a.name == "strides")
                   for n in nodes if n.op_type == "ConvTranspose"]
        if upsample == "nearest-conv":  # only the dense bottleneck's stride-1 deconvolution remains
            assert strides == [[1, 1]]
        else:
            assert [2, 2] in strides


def test_flops_scale_with_area_and_count_macs_twice():
    small = NetworkConfig(input_size=64, output_size=32, widths=[4, 8, 8, 8, 8])
    big = dataclasses.replace(small, input_size=128, output_size=64)
    assert flops(big) == 4 * flops(small)
    # hand count, 2 × MAC, for encoder/decoder without residual blocks (32-px output: 4 up-stages)
    bare = dataclasses.replace(small, encoder_blocks=0, decoder_blocks=0)
    enc = 32 * 32 * 4 * 1 * 9 + 16 * 16 * 8 * 4 * 9 + (8 * 8 + 4 * 4 + 2 * 2) * 8 * 8 * 9
    dec = (2 * 2 * 8 * 8 + 4 * 4 * 8 * 8 + 8 * 8 * 8 * 8 + 16 * 16 * 8 * 4) * 4  # ConvTranspose k=2: in × out × 4
    heads = 2 * 32 * 32 * 4 * 9
    assert flops(bare) == 2 * (enc + dec + heads)


def test_batchnorm_folds_exactly():
    cfg = dataclasses.replace(load_preset("tiny").network, batchnorm=True)
    model = build_network(cfg)
    for m in model.modules():  # non-trivial statistics so that folding has something to do
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        ref = model(x)
        folded = fold_batchnorm(model)
        got = folded(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    for r, g in zip(ref, got, strict=True):
        assert torch.allclose(r, g, atol=1e-5)


def test_config_errors_name_the_key():
    d = load_preset("tiny").to_dict()
    d["network"]["widthz"] = [1, 2]
    with pytest.raises(ConfigError, match="network.widthz"):
        preset_from_dict(d)
    d = load_preset("tiny").to_dict()
    d["network"]["output_size"] = 48
    with pytest.raises(ConfigError, match="output_size"):
        preset_from_dict(d)
    d = load_preset("tiny").to_dict()
    d["preprocess"]["bin"] = 2  # 64-px frames binned 2 → 32 ≠ input_size 64
    with pytest.raises(ConfigError, match="input_size"):
        preset_from_dict(d)
    with pytest.raises(ConfigError, match="unknown model preset"):
        load_preset("nope")


def test_dense_bottleneck_is_a_full_map_conv_and_stride1_deconv(tmp_path):
    cfg = load_preset("cpu-default").network
    assert cfg.bottleneck == "dense" and cfg.dense_map == 16 <= 16  # DPU conv kernels reach 16
    path = export_onnx(build_network(cfg), tmp_path / "d.onnx")
    nodes = onnx.load(str(path)).graph.node

    def attr(node, name):
        return next(list(a.ints) for a in node.attribute if a.name == name)

    big = [n for n in nodes if n.op_type in ("Conv", "ConvTranspose") and attr(n, "kernel_shape") == [16, 16]]
    assert sorted(n.op_type for n in big) == ["Conv", "ConvTranspose"]
    deconv = next(n for n in big if n.op_type == "ConvTranspose")
    assert attr(deconv, "strides") == [1, 1]
