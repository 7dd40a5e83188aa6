"""The three deployment schemes (dpu-pow2, trt-int8, fp16): what each quantizes and how, emitted as ONNX.

dpu-pow2 (Vitis AI DPU numerics): symmetric per-tensor int8 with scale 2**-fix_point for activations,
weights and biases. Activation fix_points come from the observer; weights use min-MSE over pow2 candidates
(the DPU quantizer's default) rounded half away from zero; the bias is int8 at its own non-overflow
fix_point. Then the DPU compiler's constraints are applied until they all hold (refine_dpu): concat inputs
and output share the coarsest fix_point; a resize keeps its input's; eltwise add shift_read ≤ 7 and
shift_write ∈ [−7, 25]; conv shift_cut = fp_in + fp_w − fp_out ∈ [0, 16] (moves fp_w); shift_bias =
fp_in + fp_w − fp_b ∈ [min(0, shift_cut − 16), 15] (moves fp_b). Emitted as standard QDQ that ONNX Runtime
runs: Q/DQ after the graph input and after every layer output (after the fused ReLU), weights and the bias as
DequantizeLinear of int8 initializers feeding the Conv's weight and (float) bias inputs.

trt-int8 (TensorRT 10 strongly typed, explicit quantization): Q/DQ on the activation input of every
Conv/ConvTranspose, symmetric int8, zero-point 0, scale amax/127; weights per output channel (axis 0 for
Conv, 1 for ConvTranspose), bias float (TensorRT fuses it). A tensor has one Q/DQ pair read by all its
consumers, so a residual Add's skip input is quantized exactly like the convolution reading the same tensor.

fp16: ONNX Runtime's float16 conversion with float32 graph inputs and outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .graph import Layer, initializers, insert_qdq, integer_layers, load_float_model, quantize_initializer
from .qdq import convert_fp16, pow2_fix_point, quantize_pow2_weights, split_heads

DEFAULT_OBSERVER = "mse"
DEFAULT_WEIGHTS = "mse"


@dataclass(frozen=True)
class Scheme:
    """A deployment scheme and the HAL backend/precision that runs its calibrated model with target numerics."""

    name: str
    summary: str
    backend: str
    precision: str
    int8: bool


SCHEMES: dict[str, Scheme] = {
    "fp16": Scheme("fp16", "FP16 tensors, FP32 I/O (TensorRT FP16 engine on Jetson)", "cpu", "fp32", False),
    "trt-int8": Scheme("trt-int8", "int8 Q/DQ, per-channel weights (TensorRT 10 strongly typed on Jetson)",
                       "jetson-emu", "int8", True),
    "dpu-pow2": Scheme("dpu-pow2", "int8, power-of-two per-tensor scales, int8 bias (Vitis AI DPU on Alveo)",
                       "alveo-emu", "int8", True),
}


@dataclass
class QuantResult:
    """What a scheme decided: fix_points (dpu-pow2), scales (trt-int8), and each constraint adjustment made."""

    scheme: str
    observer: str | None = None
    weights: str | None = None
    activations: list[str] = field(default_factory=list)
    fix_points: dict[str, dict[str, int]] = field(default_factory=dict)
    scales: dict[str, Any] = field(default_factory=dict)
    adjustments: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def get_scheme(name: str) -> Scheme:
    if name not in SCHEMES:
        raise ValueError(f"unknown scheme '{name}'; known: {', '.join(SCHEMES)}")
    return SCHEMES[name]


def quantize_model(src: str | Path, dst: str | Path, scheme: str, calibration: np.ndarray | None,
                   observer: str = DEFAULT_OBSERVER, weights: str = DEFAULT_WEIGHTS,
                   progress: Callable[[int], None] | None = None,
                   activation_fix_points: dict[str, int] | None = None) -> QuantResult:
    """Write `src` (FP32 ONNX) converted to `scheme` at `dst`; int8 schemes calibrate on `calibration`
    (preprocessed float32 (n, 1, N, N)) with `observer`. dpu-pow2 takes `activation_fix_points` instead of
    observing when given (after QAT). Returns the decisions made."""
    import onnx

    get_scheme(scheme)
    if scheme == "fp16":
        convert_fp16(src, dst)
        return QuantResult("fp16")
    if (calibration is None or len(calibration) == 0) and activation_fix_points is None:
        raise ValueError(f"scheme '{scheme}' needs calibration patterns")
    model = load_float_model(src)
    heads = split_heads(model)
    head_nodes = {n for h in heads.values() for n in h.nodes if n}
    layers = integer_layers(model, head_nodes)
    x = None if calibration is None else np.ascontiguousarray(calibration, dtype=np.float32)
    if scheme == "dpu-pow2":
        result = _dpu_pow2(model, layers, x, observer, weights, progress, activation_fix_points)
    else:
        result = _trt_int8(model, layers, x, observer, weights, progress)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return result


# --- dpu-pow2 -----------------------------------------------------------------------------------------
def _dpu_pow2(model, layers: list[Layer], x: np.ndarray | None, observer: str, weights: str,
              progress: Callable[[int], None] | None, given: dict[str, int] | None = None) -> QuantResult:
    from .calibration import collect_observers
    from .observers import weight_fix_point

    inp = model.graph.input[0].name
    acts = [inp] + [ly.output for ly in layers]
    known = set(acts)
    for ly in layers:
        missing = [t for t in ly.inputs if t not in known]
        if missing:
            raise ValueError(f"layer '{ly.name}' reads {missing}, which no integer layer produces")
    if given is not None:
        missing = [t for t in acts if t not in given]
        if missing:
            raise ValueError(f"activation fix_points lack {missing[:3]}; they belong to another graph")
        fp = {t: int(given[t]) for t in acts}
    else:
        obs = collect_observers(model, x, acts, observer, progress=progress)
        fp = {t: obs[t].fix_point() for t in acts}
    inits = initializers(model)
    convs = [ly for ly in layers if ly.kind in ("conv", "convtranspose")]
    fw = {ly.weight: weight_fix_point(inits[ly.weight], weights) for ly in convs}
    fb = {ly.bias: pow2_fix_point(float(np.abs(inits[ly.bias]).max(initial=0.0))) for ly in convs if ly.bias}
    adjustments = refine_dpu(layers, fp, fw, fb)
    for t in acts:
        insert_qdq(model, t, np.float32(2.0 ** -fp[t]), np.int8(0))
    for table in (fw, fb):
        for name, f in table.items():
            quantize_initializer(model, name, quantize_pow2_weights(inits[name], f), np.float32(2.0**-f))
    return QuantResult("dpu-pow2", observer, weights, acts,
                       {"activations": fp, "weights": fw, "biases": fb}, {}, adjustments)


def refine_dpu(layers: list[Layer], fp: dict[str, int], fw: dict[str, int], fb: dict[str, int],
               max_loops: int = 10) -> list[str]:
    """Move fix_points until every DPU compiler constraint holds (module docstring); returns what moved."""
    log: list[str] = []

    def put(table: dict[str, int], key: str, value: int, rule: str) -> bool:
        if table[key] == value:
            return False
        log.append(f"{rule}: {key} fix_point {table[key]} -> {value}")
        table[key] = value
        return True

    for _ in range(max_loops):
        changed = False
        for ly in layers:
            if ly.kind in ("concat", "resize"):  # shared fix_point: the coarsest, so nothing overflows
                m = min(fp[t] for t in [*ly.inputs, ly.output])
                for t in [*ly.inputs, ly.output]:
                    changed |= put(fp, t, m, f"{ly.kind} '{ly.name}' shares one fix_point")
            elif ly.kind == "add":
                lo = min(fp[t] for t in ly.inputs)
                for t in ly.inputs:
                    if fp[t] - lo > 7:
                        changed |= put(fp, t, lo + 7, f"add '{ly.name}' shift_read <= 7")
                sw = lo - fp[ly.output]
                if not -7 <= sw <= 25:
                    changed |= put(fp, ly.output, lo - min(max(sw, -7), 25), f"add '{ly.name}' shift_write")
            else:
                i, o = fp[ly.inputs[0]], fp[ly.output]
                sc = fw[ly.weight] + i - o
                if not 0 <= sc <= 16:
                    changed |= put(fw, ly.weight, min(max(sc, 0), 16) + o - i, f"{ly.kind} '{ly.name}' shift_cut")
                if ly.bias:
                    sc = fw[ly.weight] + i - o
                    sb = fw[ly.weight] + i - fb[ly.bias]
                    lo_sb = min(0, sc - 16)
                    if not lo_sb <= sb <= 15:
                        new = fw[ly.weight] + i - min(max(sb, lo_sb), 15)
                        changed |= put(fb, ly.bias, new, f"{ly.kind} '{ly.name}' shift_bias")
        if not changed:
            return log
    raise ValueError(f"DPU fix_point constraints did not settle in {max_loops} passes: {log[-4:]}")


# --- trt-int8 -----------------------------------------------------------------------------------------
def _trt_int8(model, layers: list[Layer], x: np.ndarray, observer: str, weights: str,
              progress: Callable[[int], None] | None) -> QuantResult:
    from .calibration import collect_observers

    convs = [ly for ly in layers if ly.kind in ("conv", "convtranspose")]
    points = list(dict.fromkeys(ly.inputs[0] for ly in convs))
    obs = collect_observers(model, x, points, observer, progress=progress)
    scales = {t: float(obs[t].amax()) / 127.0 for t in points}
    for t in points:
        insert_qdq(model, t, np.float32(scales[t]), np.int8(0))
    inits = initializers(model)
    wscales: dict[str, list[float]] = {}
    for ly in convs:
        if ly.weight in wscales:
            continue
        w = inits[ly.weight].astype(np.float32)
        axis = 0 if ly.kind == "conv" else 1  # output channels: Conv (O, I, k, k), ConvTranspose (I, O, k, k)
        amax = np.abs(np.moveaxis(w, axis, 0)).reshape(w.shape[axis], -1).max(axis=1)
        s = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        shape = [1] * w.ndim
        shape[axis] = -1
        q = np.clip(np.rint(w / s.reshape(shape)), -128, 127).astype(np.int8)  # rint: half to even, as Q does
        quantize_initializer(model, ly.weight, q, s, axis=axis)
        wscales[ly.weight] = s.tolist()
    return QuantResult("trt-int8", observer, "minmax per channel", points, {},
                       {"activations": scales, "weights": wscales}, [])


def read_fix_points(qdq_model) -> dict[str, int]:
    """fix_point per quantized tensor of a model: activations (by the tensor a QuantizeLinear reads) and int8
    constants (by the DequantizeLinear output, i.e. the weight/bias name); raises unless one power of two."""
    out: dict[str, int] = {}
    inits = initializers(qdq_model)
    for node in qdq_model.graph.node:
        is_const = node.op_type == "DequantizeLinear" and node.input[0] in inits
        if node.op_type != "QuantizeLinear" and not is_const:
            continue
        s = np.asarray(inits[node.input[1]], np.float64).reshape(-1)
        fp = -np.log2(s)
        if s.size != 1 or fp[0] != np.round(fp[0]):
            raise ValueError(f"scale of '{node.input[0]}' is {s[:4]}…, not one power of two")
        out[node.output[0] if is_const else node.input[0]] = int(np.round(fp[0]))
    return out


def calibrate_artifact(model: str | Path, scheme: str, out: str | Path, data: Any = None,
                       n: int = 512, observer: str = DEFAULT_OBSERVER, weights: str = DEFAULT_WEIGHTS,
                       progress: Callable[[str, int], Callable[[int], None]] | None = None,
                       qat_data: str | Path | None = None, qat: Any = None,
                       log: Callable[[str], None] = print):
    """Quantize the model artifact `model` (zoo name or .onnx with sidecar) to `scheme` at `out`, calibrated
    on `n` patterns of `data` (CXI path, 'sim:KIND[:SEED]' or a CalibrationData); writes the hash-checked JSON
    sidecar: the parent's metadata plus the scheme, observer, calibration spec and every fix_point / scale.

    `progress(stage, total)` returns a per-pattern callback (the CLI's tqdm bars). With `qat_data` (a training
    set directory) dpu-pow2 is fine-tuned with fake quantization (qat.QatSettings `qat`) and re-quantised at
    the calibrated activation fix_points; the fine-tuned FP32 model is kept beside `out` (*.qat-fp32.onnx).
    """
    import onnxruntime

    from ..model.artifact import ModelArtifact, write_artifact
    from .calibration import CalibrationData, load_calibration

    info = get_scheme(scheme)
    parent = ModelArtifact.load(model)
    out = Path(out)
    if out.resolve() == parent.path.resolve():
        raise ValueError(f"--out {out} would overwrite the FP32 model")
    out.parent.mkdir(parents=True, exist_ok=True)
    cal_spec: dict[str, Any] | None = None
    x = None
    if info.int8:
        if data is None:
            raise ValueError(f"scheme '{scheme}' needs calibration data (a CXI scan or sim:KIND[:SEED])")
        cal = data if isinstance(data, CalibrationData) else load_calibration(
            data, parent, n, (lambda total: progress("read + preprocess", total)) if progress else None)
        x, cal_spec = cal.x, cal.spec
    result = quantize_model(parent.path, out, scheme, x, observer, weights,
                            progress("FP32 statistics", len(x)) if progress and x is not None else None)
    qat_info = None
    if qat_data is not None:
        if scheme != "dpu-pow2":
            raise ValueError("quantization-aware fine-tuning is implemented for dpu-pow2 only")
        from ..model.artifact import sha256_file
        from ..model.export import export_onnx
        from .qat import QatSettings, qat_finetune

        acts = result.fix_points["activations"]
        net, qat_info = qat_finetune(parent, [acts[t] for t in result.activations], qat_data,
                                     qat or QatSettings(), log)
        fp32 = export_onnx(net, out.with_name(out.stem + ".qat-fp32.onnx"))
        # weights at their non-overflow fix_point: what the fake-quant trained against
        result = quantize_model(fp32, out, scheme, x, observer, "minmax", activation_fix_points=acts)
        qat_info.update({"fp32_model": str(fp32), "fp32_sha256": sha256_file(fp32)})
    meta = {k: v for k, v in parent.metadata.items() if k not in ("sha256", "metrics")}
    meta.update({
        "name": f"{parent.name}-{scheme}",
        "parent": {"name": parent.name, "sha256": parent.sha256, "path": str(parent.path),
                   "metrics": parent.metadata.get("metrics", {})},
        "quantization": {**result.to_dict(), "calibration": cal_spec, "backend": info.backend,
                         "precision": info.precision, "onnxruntime": onnxruntime.__version__},
    })
    if not info.int8:
        meta["quantization"].pop("observer")
    if qat_info is not None:
        meta["quantization"]["qat"] = qat_info
    return write_artifact(out, meta), result
