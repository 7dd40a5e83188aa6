"""The DPU emulator is bit-exact: every layer type against an independent int64 reference, whole programs too,
and it differs from ONNX Runtime's QDQ run only where ORT rounds an exact tie half to even."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from quant_support import concat_model, patterns

from edgeptycho.quantization import dpu_emulator as de
from edgeptycho.quantization.schemes import quantize_model

RNG = np.random.default_rng(42)


# --- an independent int64 reference: exact rationals, plain loops -----------------------------------------
def round_half_up(num: np.ndarray, den_log2: int) -> np.ndarray:
    """floor(num / 2**den_log2 + 1/2) in exact integer arithmetic (den_log2 may be negative)."""
    num = np.asarray(num, dtype=object)
    if den_log2 <= 0:
        return (num * (2 ** -den_log2)).astype(np.int64)
    return ((2 * num + 2**den_log2) // 2 ** (den_log2 + 1)).astype(np.int64)


def ref_conv(x, w, stride, pads, dil):
    b, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.zeros((b, c, h + pads[0] + pads[2], wd + pads[1] + pads[3]), np.int64)
    xp[:, :, pads[0]:pads[0] + h, pads[1]:pads[1] + wd] = x
    ho = (xp.shape[2] - dil[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (xp.shape[3] - dil[1] * (kw - 1) - 1) // stride[1] + 1
    acc = np.zeros((b, o, ho, wo), np.int64)
    for i in range(ho):
        for j in range(wo):
            r, q = i * stride[0], j * stride[1]
            patch = xp[:, :, r:r + dil[0] * (kh - 1) + 1:dil[0], q:q + dil[1] * (kw - 1) + 1:dil[1]]
            acc[:, :, i, j] = np.einsum("bcuv,ocuv->bo", patch, w.astype(np.int64))
    return acc


def ref_conv_transpose(x, w, stride, pads, out_pad):
    b, c, h, wd = x.shape
    _, o, kh, kw = w.shape
    hf, wf = (h - 1) * stride[0] + kh + out_pad[0], (wd - 1) * stride[1] + kw + out_pad[1]
    full = np.zeros((b, o, hf, wf), np.int64)
    for i in range(h):
        for j in range(wd):
            full[:, :, i * stride[0]:i * stride[0] + kh, j * stride[1]:j * stride[1] + kw] += np.einsum(
                "bc,couv->bouv", x[:, :, i, j].astype(np.int64), w.astype(np.int64))
    return full[:, :, pads[0]:hf - pads[2], pads[1]:wf - pads[3]]


def ref_requant(acc, bias, fp_x, fp_w, fp_b, fp_o, relu):
    """Exact value acc·2^-(fp_x+fp_w) + bias·2^-fp_b, to fp_o with floor(v + ½), ReLU, saturation."""
    k = max(fp_x + fp_w, fp_b)
    num = acc.astype(object) * 2 ** (k - fp_x - fp_w)
    if bias is not None:
        num = num + (bias.astype(object) * 2 ** (k - fp_b)).reshape(1, -1, 1, 1)
    q = round_half_up(num, k - fp_o)
    return np.clip(q, 0 if relu else -128, 127).astype(np.int8)


def i8(*shape):
    return RNG.integers(-128, 128, shape).astype(np.int8)


# --- layer by layer ------------------------------------------------------------------------------------
@pytest.mark.parametrize("stride, pads, dil, k", [((1, 1), (1, 1, 1, 1), (1, 1), 3), ((2, 2), (1, 1, 1, 1), (1, 1), 3),
                                                  ((2, 2), (2, 2, 2, 2), (1, 1), 5), ((1, 1), (0, 0, 0, 0), (1, 1), 1),
                                                  ((1, 2), (0, 1, 2, 1), (2, 1), 3)])
@pytest.mark.parametrize("fps", [(3, 7, 9, 6), (2, 8, 12, 1), (5, 9, 18, 9), (0, 6, 4, 4)])
@pytest.mark.parametrize("relu", [True, False])
def test_conv_matches_int64_reference(stride, pads, dil, k, fps, relu):
    fp_x, fp_w, fp_b, fp_o = fps  # third case: bias finer than the accumulator (negative shift_bias)
    x, w, b = i8(2, 5, 9, 11), i8(4, 5, k, k), i8(4)
    for dtype in (np.float32, np.float64, np.int64):
        acc = de.conv2d_acc(x, w, stride, pads, dil, dtype=dtype)
        np.testing.assert_array_equal(acc, ref_conv(x, w, stride, pads, dil))
    got = de.conv_requantize(acc, b, fp_x + fp_w - fp_b, fp_x + fp_w - fp_o, relu)
    np.testing.assert_array_equal(got, ref_requant(acc, b, fp_x, fp_w, fp_b, fp_o, relu))


@pytest.mark.parametrize("k, stride, pads, out_pad", [(2, 2, (0, 0, 0, 0), (0, 0)), (4, 2, (1, 1, 1, 1), (0, 0)),
                                                     (3, 2, (1, 1, 1, 1), (1, 1)), (3, 1, (1, 1, 1, 1), (0, 0))])
def test_conv_transpose_matches_int64_reference(k, stride, pads, out_pad):
    x, w, b = i8(2, 6, 5, 7), i8(6, 3, k, k), i8(3)
    acc = de.conv_transpose2d_acc(x, w, (stride, stride), pads, (1, 1), out_pad, dtype=np.float32)
    np.testing.assert_array_equal(acc, ref_conv_transpose(x, w, (stride, stride), pads, out_pad))
    got = de.conv_requantize(acc, b, 4 + 7 - 8, 4 + 7 - 3, True)
    np.testing.assert_array_equal(got, ref_requant(acc, b, 4, 7, 8, 3, True))


@pytest.mark.parametrize("fps, fp_out", [((4, 4), 3), ((2, 6), 4), ((5, 0), -2), ((3, 10), 9), ((6, 3), 12)])
@pytest.mark.parametrize("relu", [True, False])
def test_residual_add_matches_exact_rounding(fps, fp_out, relu):
    a, b = i8(2, 3, 6, 6), i8(2, 3, 6, 6)
    got = de.eltwise_add([a, b], list(fps), fp_out, relu)
    k = max(fps)  # shift_read <= 7 in every case: the sum is exact before the one rounding
    num = a.astype(object) * 2 ** (k - fps[0]) + b.astype(object) * 2 ** (k - fps[1])
    want = np.clip(round_half_up(num, k - fp_out), 0 if relu else -128, 127)
    np.testing.assert_array_equal(got, want)


def test_concat_and_resize_move_data_only():
    a, b = i8(2, 3, 4, 4), i8(2, 2, 4, 4)
    cat = np.concatenate([de.requantize_shift(a, 5, 5), de.requantize_shift(b, 5, 5)], axis=1)
    assert cat.shape == (2, 5, 4, 4) and np.array_equal(cat[:, 3:], b)
    up = de.resize_nearest(a, (2, 2))
    ii, jj = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    np.testing.assert_array_equal(up, a[:, :, ii // 2, jj // 2])
    # a mismatched fix_point is requantised half up: 2 LSB coarser turns 6 → 2 (6/4 = 1.5 → 2), -6 → -1
    np.testing.assert_array_equal(de.requantize_shift(np.int8([6, -6, 5]), 5, 3), np.int8([2, -1, 1]))


def test_float32_accumulation_falls_back_when_the_bound_is_exceeded():
    w = np.full((2, 256, 3, 3), 127, np.int8)  # 128 · 256·9·127 ≈ 2^25.2 > 2^24
    assert de.accumulator_dtype(w, 0) is np.float64
    assert de.accumulator_dtype(w[:, :64], 0) is np.float32
    x = np.full((1, 256, 3, 3), -128, np.int8)
    np.testing.assert_array_equal(de.conv2d_acc(x, w, dtype=np.float64), ref_conv(x, w, (1, 1), (0,) * 4, (1, 1)))


# --- whole programs -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def concat_dpu(tmp_path_factory):
    d = tmp_path_factory.mktemp("emu")
    src = concat_model(d / "concat.onnx")
    dst = d / "concat-dpu.onnx"
    quantize_model(src, dst, "dpu-pow2", patterns(48, 32, seed=1))
    return dst


def reference_program(emu: de.DpuEmulator, q: np.ndarray) -> dict[str, np.ndarray]:
    """The emulator's parsed program run with the reference kernels above."""
    env = {emu.input_name: q}
    for op in emu.ops:
        xs = [env[t] for t in op.inputs]
        fps = [emu.fps[t] for t in op.inputs]
        if op.kind == "conv":
            acc = ref_conv(xs[0], op.w, op.attrs["strides"], op.attrs["pads"], op.attrs["dilations"])
        elif op.kind == "convtranspose":
            acc = ref_conv_transpose(xs[0], op.w, op.attrs["strides"], op.attrs["pads"], op.attrs["output_padding"])
        if op.kind in ("conv", "convtranspose"):
            env[op.output] = ref_requant(acc, op.b, fps[0], op.fp_w, op.fp_b, op.fp_out, op.relu)
        elif op.kind == "add":
            k = max(fps)
            num = sum(x.astype(object) * 2 ** (k - f) for x, f in zip(xs, fps, strict=True))
            env[op.output] = np.clip(round_half_up(num, k - op.fp_out), 0 if op.relu else -128, 127)
        elif op.kind == "concat":
            assert len(set(fps + [op.fp_out])) == 1
            env[op.output] = np.concatenate(xs, axis=1)
        else:
            fh, fw = op.attrs["factors"]
            env[op.output] = xs[0].repeat(fh, axis=2).repeat(fw, axis=3)
    return env


def test_whole_program_matches_reference_for_every_layer_type(concat_dpu):
    emu = de.DpuEmulator.load(concat_dpu)
    assert {op.kind for op in emu.ops} == {"conv", "convtranspose", "add", "concat", "resize"}
    q = de.quantize_pow2(patterns(3, 32, seed=9), emu.fp_in)
    got = emu.run_int8(q, keep=True)
    want = reference_program(emu, q)
    for op in emu.ops:
        np.testing.assert_array_equal(got[op.output], want[op.output], err_msg=op.name)


def test_ort_differs_only_at_exact_ties(tmp_path):
    """First layer of a real model: every output where ORT's QDQ run differs from the emulator is a .5 tie."""
    import onnxruntime as ort

    dst = tmp_path / "m.onnx"
    quantize_model(concat_model(tmp_path / "c.onnx"), dst, "dpu-pow2", patterns(32, 32, seed=1))
    emu = de.DpuEmulator.load(dst)
    x = patterns(8, 32, seed=3)
    q = de.quantize_pow2(x, emu.fp_in)
    stem = emu.ops[0]
    stats = emu.compare_with_ort(de.dequantize_pow2(q, emu.fp_in))
    acc = de.conv2d_acc(q, stem.w, stem.attrs["strides"], stem.attrs["pads"], stem.attrs["dilations"])
    v = (acc.astype(np.float64) * 2.0 ** -(emu.fp_in + stem.fp_w) + (stem.b * 2.0 ** -stem.fp_b).reshape(1, -1, 1, 1)) \
        * 2.0**stem.fp_out
    tie = (v - np.floor(v)) == 0.5
    model = onnx.load(str(dst))
    from edgeptycho.quantization.calibration import run_intermediates

    ort_out = run_intermediates(model, de.dequantize_pow2(q, emu.fp_in), [emu.dq_names[stem.output]])
    ort_q = np.rint(ort_out[emu.dq_names[stem.output]] * 2.0**stem.fp_out).astype(np.int64)
    diff = ort_q != emu.run_int8(q, keep=True)[stem.output]
    assert diff.any() or not tie.any()
    assert not (diff & ~tie).any()  # never away from a tie
    assert stats[stem.output]["max_lsb"] == 1.0 and 0 < stats[stem.output]["fraction_differing"] < 0.05
    assert ort.__version__


def test_alveo_emu_runs_the_emulator_and_keeps_ort_numerics_for_comparison(concat_dpu, hw_cache):
    from edgeptycho.hw import open_backend

    x = patterns(6, 32, seed=4)
    emu = de.DpuEmulator.load(concat_dpu).run(x)
    with open_backend("alveo-emu", concat_dpu, 4) as b:
        assert b.numerics == "dpu"
        got = b.infer(x)
    with open_backend("alveo-emu", concat_dpu, 4, numerics="ort-qdq") as b:
        ort_run = b.infer(x)
    for k in emu:
        np.testing.assert_array_equal(got[k], emu[k])
        assert np.abs(ort_run[k] - got[k]).max() < 0.5 * np.ptp(got[k])  # same model, tie-rounding aside
    with pytest.raises(ValueError, match="numerics"):
        open_backend("alveo-emu", concat_dpu, 4, numerics="float")


def test_emulator_refuses_models_that_are_not_dpu_pow2(tmp_path):
    src = concat_model(tmp_path / "c.onnx")
    trt = tmp_path / "trt.onnx"
    quantize_model(src, trt, "trt-int8", patterns(16, 32))
    with pytest.raises(ValueError, match="per-channel|power of two|not quantised"):
        de.DpuEmulator.load(trt)
