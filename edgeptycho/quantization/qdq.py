"""Derive FP16 and int8 QDQ ONNX models (trt-int8, dpu-pow2) from an FP32 model, cached; pow2 int8 helpers.

Schemes (docs/quantization.md; the emitters live in schemes.py):
- ``fp16``: every float tensor FP16, graph inputs/outputs kept float32 (what a strongly typed TensorRT FP16
  engine runs).
- ``trt-int8``: explicit-quantization QDQ for TensorRT: symmetric signed int8, zero-point 0, per-channel
  weights, float bias (TensorRT fuses it), Q/DQ on the inputs of every Conv/ConvTranspose.
- ``dpu-pow2``: the DPU's scheme: symmetric, per-tensor, every scale (activations, weights, biases) a power
  of two, int8 bias, concat inputs sharing one fix_point, the DPU compiler's shift limits applied. ORT runs it
  rounding half to even; the bit-exact integer emulator (dpu_emulator.py) rounds half up as the DPU does.

In both int8 schemes the output heads (tanh·π, softplus/sigmoid·range, after the last convolution) stay float:
the DPU cannot run them and they run on the CPU after dequantisation.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SCHEMES = ("fp16", "trt-int8", "dpu-pow2")
RECIPE_VERSION = "2"  # bump when a derivation changes so cached models are rebuilt
HEAD_OPS = ("Softplus", "Sigmoid", "Tanh", "Mul", "Div", "Add", "Sub", "Identity")
CALIBRATION_BATCH = 8


# --- power-of-two int8 (the DPU's fix_point convention: real = int8 · 2**-fix_point) -------------------------
def pow2_fix_point(amax: float) -> int:
    """The largest fix_point whose int8 range [-128, 127]·2**-fp still holds ±amax (non-overflow)."""
    amax = max(float(amax), 2.0**-24)
    return int(math.floor(math.log2(127.0 / amax)))


def quantize_pow2(x: np.ndarray, fix_point: int, out: np.ndarray | None = None) -> np.ndarray:
    """float → int8 as the DPU does: round half up (floor(x·2**fp + 0.5)), saturate to [-128, 127]."""
    y = np.floor(np.asarray(x, dtype=np.float32) * np.float32(2.0**fix_point) + np.float32(0.5))
    np.clip(y, -128, 127, out=y)
    if out is None:
        return y.astype(np.int8)
    out[...] = y
    return out


def quantize_pow2_weights(x: np.ndarray, fix_point: int) -> np.ndarray:
    """float → int8 as the DPU quantizer rounds weights and biases: half away from zero (STD_ROUND), saturated."""
    y = np.asarray(x, dtype=np.float64) * 2.0**fix_point
    return np.clip(np.sign(y) * np.floor(np.abs(y) + 0.5), -128, 127).astype(np.int8)


def dequantize_pow2(q: np.ndarray, fix_point: int, out: np.ndarray | None = None) -> np.ndarray:
    """int8 → float32: q · 2**-fix_point (exact in float32)."""
    return np.multiply(q, np.float32(2.0**-fix_point), out=out, dtype=np.float32)


# --- the output heads that stay float ------------------------------------------------------------------------
@dataclass
class Head:
    """Elementwise ops between a graph output and the last non-head tensor (`pre`), in forward order.

    ops: (op_type, constant or None, constant_is_first_operand).
    """

    output: str
    pre: str
    nodes: list[str] = field(default_factory=list)
    ops: list[tuple[str, float | None, bool]] = field(default_factory=list)

    def apply(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Run the head on float32 `x` (vectorised numpy), into `out` if given."""
        y = np.asarray(x, dtype=np.float32)
        for op, c, const_first in self.ops:
            if op == "Softplus":
                y = np.logaddexp(np.float32(0), y)
            elif op == "Sigmoid":
                y = np.exp(-np.logaddexp(np.float32(0), -y))
            elif op == "Tanh":
                y = np.tanh(y)
            elif op == "Identity":
                pass
            else:
                c32 = np.float32(c)
                a, b = (c32, y) if const_first else (y, c32)
                y = {"Mul": np.multiply, "Div": np.divide, "Add": np.add, "Sub": np.subtract}[op](a, b)
        y = y.astype(np.float32, copy=False)
        if out is None:
            return y
        out[...] = y
        return out


def split_heads(model) -> dict[str, Head]:
    """Per graph output, the chain of elementwise head ops back to the last convolution's output."""
    from onnx import numpy_helper

    graph = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    const_nodes = {}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(attr.t)
                    const_nodes[node.output[0]] = node.name
    producer = {out: node for node in graph.node for out in node.output}
    heads = {}
    for gout in graph.output:
        head = Head(output=gout.name, pre=gout.name)
        node = producer.get(gout.name)
        while node is not None and node.op_type in HEAD_OPS:
            data = [i for i in node.input if i not in consts]
            const = [i for i in node.input if i in consts]
            if len(data) != 1 or any(consts[c].size != 1 for c in const):
                break  # not elementwise-with-a-scalar: part of the body
            c = float(consts[const[0]].reshape(())) if const else None
            head.ops.insert(0, (node.op_type, c, bool(const) and node.input[0] == const[0]))
            head.nodes.append(node.name)
            head.nodes += [const_nodes[k] for k in const if k in const_nodes]
            head.pre = data[0]
            node = producer.get(data[0])
        heads[gout.name] = head
    return heads


def is_quantized(model_path: str | Path) -> bool:
    """True when the ONNX model already carries QuantizeLinear/DequantizeLinear nodes."""
    import onnx

    try:
        graph = onnx.load(str(model_path), load_external_data=False).graph
    except Exception as exc:  # protobuf DecodeError and friends do not name the file
        raise ValueError(f"{model_path}: not a readable ONNX model ({exc})") from exc
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node)


def input_fix_point(qdq_path: str | Path, tensor: str) -> int:
    """fix_point of the QuantizeLinear that consumes `tensor` in a dpu-pow2 model (scale must be 2**-fp)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(qdq_path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] == tensor:
            scale = float(inits[node.input[1]].reshape(()))
            fp = -math.log2(scale)
            if fp != int(fp):
                raise ValueError(f"{qdq_path}: scale {scale} of '{tensor}' is not a power of two")
            return int(fp)
    raise ValueError(f"{qdq_path}: no QuantizeLinear consumes '{tensor}'")


# --- calibration -----------------------------------------------------------------------------------------
def synthetic_patterns(n: int, size: int, seed: int = 0) -> np.ndarray:
    """(n, 1, size, size) preprocessed model input from random diffraction-like patterns.

    A bright centre (Gaussian envelope, random width and 10²–10⁵ photons) times log-normal speckle, then the
    one preprocessing (log1p, frame-mean normalisation). Stands in for real frames when none are given.
    """
    from ..model.preprocess import PreprocessSpec, preprocess

    rng = np.random.default_rng(seed)
    r = np.hypot(*np.meshgrid(np.arange(size) - size // 2, np.arange(size) - size // 2, indexing="ij"))
    width = rng.uniform(0.05, 0.3, (n, 1, 1)) * size
    photons = 10.0 ** rng.uniform(2, 5, (n, 1, 1))
    frames = photons * np.exp(-((r / width) ** 2)) * rng.lognormal(0.0, 1.0, (n, size, size))
    return preprocess(rng.poisson(frames).astype(np.float32), PreprocessSpec(bin=1))


def resolve_calibration(calibration, size: int, who: str, n_synthetic: int = 64) -> np.ndarray:
    """Calibration input (n, 1, size, size) float32 from an array or .npy path; synthetic (logged) when None."""
    if calibration is None:
        log.warning("%s: no calibration data given; calibrating int8 on %d synthetic log-normal patterns. "
                    "Real preprocessed frames from the beamline (option calibration=array or .npy path) "
                    "give better int8 ranges.", who, n_synthetic)
        return synthetic_patterns(n_synthetic, size, seed=0)
    if isinstance(calibration, (str, Path)):
        calibration = np.load(calibration, allow_pickle=False)
    x = np.asarray(calibration, dtype=np.float32)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1:] != (1, size, size) or len(x) == 0:
        raise ValueError(f"{who}: calibration must be preprocessed frames (n, 1, {size}, {size}), got {x.shape}")
    return np.ascontiguousarray(x)


def convert_fp16(src: str | Path, dst: str | Path) -> Path:
    """FP16 copy of an FP32 model: every float tensor half precision, graph inputs/outputs kept float32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))
    return Path(dst)


def derive_model(model_path: str | Path, scheme: str, cache: str | Path,
                 calibration: np.ndarray | None = None) -> Path:
    """Path of `model_path` converted to `scheme`, built once per (model, scheme, calibration, ORT) in `cache`.

    int8 schemes need `calibration`, preprocessed float32 (n, 1, N, N); the caller decides what to use.
    """
    import onnxruntime

    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme '{scheme}'; known: {', '.join(SCHEMES)}")
    src = Path(model_path)
    h = hashlib.sha256(src.read_bytes())
    h.update(f"{scheme}|{RECIPE_VERSION}|{onnxruntime.__version__}".encode())
    if scheme != "fp16":
        if calibration is None:
            raise ValueError(f"scheme '{scheme}' needs calibration data")
        calibration = np.ascontiguousarray(calibration, dtype=np.float32)
        h.update(str(calibration.shape).encode())
        h.update(calibration.tobytes())
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    dst = cache / f"{src.stem}-{scheme}-{h.hexdigest()[:16]}.onnx"
    if dst.is_file():
        log.debug("using cached %s model %s", scheme, dst)
        return dst
    work = cache / f".{dst.stem}.{os.getpid()}"
    work.mkdir(exist_ok=True)
    tmp_out = work / "model.onnx"
    try:
        if scheme == "fp16":
            convert_fp16(src, tmp_out)
        else:
            from .schemes import quantize_model

            quantize_model(src, tmp_out, scheme, calibration)
        os.replace(tmp_out, dst)  # atomic: concurrent openers see a whole file or none
    finally:
        for p in work.iterdir():
            p.unlink()
        work.rmdir()
    log.info("derived %s model %s from %s", scheme, dst, src)
    return dst
