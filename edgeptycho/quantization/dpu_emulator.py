"""Bit-exact integer emulation of the Vitis AI DPU arithmetic for our CNN's ops, vectorised in NumPy.

Numerics (VART cpu-runner conv2d-fix / eltwise-fix; docs/quantization.md):
- tensors int8, scale 2**-fix_point; input quantised DPU_ROUND (half up) and saturated;
- conv / transposed conv: integer accumulate Σ x·w, add bias·2**shift_bias (shift_bias = fp_in + fp_w − fp_b,
  negative → the accumulator is shifted up instead), shift right by shift_cut = fp_in + fp_w − fp_out with
  DPU_ROUND = floor(v + ½), fused ReLU, saturate to [−128, 127];
- residual add: Σ floor(x_i·2**(7 − shift_read_i)) with shift_read_i = fp_i − min fp, then right shift by
  shift_write + 7 (shift_write = min fp − fp_out) with DPU_ROUND, fused ReLU, saturate;
- concat: inputs share the output fix_point (requantised by shift if not); nearest resize repeats pixels;
- the heads (π·tanh, softplus/sigmoid) run in float on the CPU after dequantisation, as on the card.

The accumulation runs as a float32 matrix product of integer values, exact while every partial sum stays
below 2**24: each layer's bound 128·max_o Σ|w_o| is checked when the model loads and the layer falls back to
float64 (exact below 2**53), or int64 beyond that. Fix_points are read from the dpu-pow2 QDQ model; on a card
they come from the compiled xmodel (`fix_point` attributes of the DPU subgraph's tensors) instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .qdq import Head, dequantize_pow2, quantize_pow2, split_heads

EXACT_F32 = 2**24
EXACT_F64 = 2**53


# --- integer kernels (also the units the tests check against an int64 reference) -----------------------
def dpu_round_shift(v: np.ndarray, shift: int) -> np.ndarray:
    """floor(v / 2**shift + ½) for int64 v (shift > 0), v·2**-shift exactly otherwise."""
    if shift > 0:
        return (v + (1 << (shift - 1))) >> shift
    return v << (-shift) if shift < 0 else v


def saturate(v: np.ndarray, relu: bool) -> np.ndarray:
    return np.clip(v, 0 if relu else -128, 127).astype(np.int8)


def accumulator_dtype(w: np.ndarray, axis: int) -> type:
    """Narrowest dtype whose matrix product of int8 activations with `w` is exact (per-output-channel bound)."""
    bound = 128 * int(np.abs(np.moveaxis(w.astype(np.int64), axis, 0)).reshape(w.shape[axis], -1).sum(1).max(
        initial=0))
    return np.float32 if bound < EXACT_F32 else np.float64 if bound < EXACT_F64 else np.int64


def conv2d_acc(x: np.ndarray, w: np.ndarray, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1),
               dtype: type = np.float64) -> np.ndarray:
    """Integer Σ x·w of a 2-D convolution (NCHW, weight (O, I, kh, kw), ONNX pads t, l, b, r) as int64."""
    b, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    (sh, sw), (dh, dw) = strides, dilations
    # im2col in NHWC: each window row copies contiguous channel runs (3x faster than NCHW windows)
    xp = np.zeros((b, h + pads[0] + pads[2], wd + pads[1] + pads[3], c), dtype)
    xp[:, pads[0]:pads[0] + h, pads[1]:pads[1] + wd] = x.transpose(0, 2, 3, 1)
    ho = (xp.shape[1] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp.shape[2] - dw * (kw - 1) - 1) // sw + 1
    sb, sy, sx, sc = xp.strides
    win = np.lib.stride_tricks.as_strided(xp, (b, ho, wo, kh, kw, c), (sb, sy * sh, sx * sw, sy * dh, sx * dw, sc),
                                          writeable=False)
    cols = win.reshape(b * ho * wo, kh * kw * c)
    acc = cols @ w.transpose(0, 2, 3, 1).reshape(o, -1).astype(dtype).T
    return _to_int64(acc).reshape(b, ho, wo, o).transpose(0, 3, 1, 2)


def conv_transpose2d_acc(x: np.ndarray, w: np.ndarray, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1),
                         output_padding=(0, 0), dtype: type = np.float64) -> np.ndarray:
    """Integer Σ x·w of a 2-D transposed convolution (weight (I, O, kh, kw)) as int64, ONNX output size."""
    b, c, h, wd = x.shape
    _, o, kh, kw = w.shape
    (sh, sw), (dh, dw) = strides, dilations
    cols = x.astype(dtype).transpose(0, 2, 3, 1).reshape(b * h * wd, c) @ w.reshape(c, -1).astype(dtype)
    cols = _to_int64(cols).reshape(b, h, wd, o, kh, kw).transpose(0, 3, 4, 5, 1, 2)  # (B, O, kh, kw, H, W)
    hf = (h - 1) * sh + dh * (kh - 1) + 1 + output_padding[0]
    wf = (wd - 1) * sw + dw * (kw - 1) + 1 + output_padding[1]
    full = np.zeros((b, o, hf, wf), np.int64)
    for u in range(kh):  # overlapping taps add up (kernel > stride); integers, so the order does not matter
        for v in range(kw):
            full[:, :, u * dh : u * dh + (h - 1) * sh + 1 : sh, v * dw : v * dw + (wd - 1) * sw + 1 : sw] += cols[
                :, :, u, v]
    return full[:, :, pads[0] : hf - pads[2], pads[1] : wf - pads[3]]


def _to_int64(a: np.ndarray) -> np.ndarray:
    return a.astype(np.int64, copy=False)  # the float products hold exact integers (dtype chosen by bound)


def conv_requantize(acc: np.ndarray, bias: np.ndarray | None, shift_bias: int, shift_cut: int,
                    relu: bool) -> np.ndarray:
    """DPU conv output: (acc + bias·2**shift_bias) / 2**shift_cut, DPU_ROUND, fused ReLU, saturate."""
    up = max(0, -shift_bias)  # bias finer than the accumulator: scale the accumulator up instead
    v = acc << up if up else acc.copy()
    if bias is not None:
        v += (bias.astype(np.int64) << max(0, shift_bias)).reshape(1, -1, 1, 1)
    return saturate(dpu_round_shift(v, shift_cut + up), relu)


def eltwise_add(inputs: list[np.ndarray], fps: list[int], fp_out: int, relu: bool) -> np.ndarray:
    """DPU residual add of int8 tensors at fix_points `fps` into fix_point `fp_out`."""
    lo = min(fps)
    acc = np.zeros(inputs[0].shape, np.int64)
    for x, f in zip(inputs, fps, strict=True):
        r = 7 - (f - lo)  # shift_read: 7 guard bits above the coarsest input; finer ones lose bits (floor)
        acc += (x.astype(np.int64) << r) if r >= 0 else (x.astype(np.int64) >> -r)
    return saturate(dpu_round_shift(acc, lo - fp_out + 7), relu)


def requantize_shift(x: np.ndarray, fp_in: int, fp_out: int) -> np.ndarray:
    """int8 at fp_in → int8 at fp_out (DPU_ROUND, saturate); identity when they match."""
    if fp_in == fp_out:
        return x
    return saturate(dpu_round_shift(x.astype(np.int64), fp_in - fp_out), False)


def resize_nearest(x: np.ndarray, factors: tuple[int, int]) -> np.ndarray:
    return np.repeat(np.repeat(x, factors[0], axis=2), factors[1], axis=3)


# --- the program ------------------------------------------------------------------------------------------
@dataclass
class Op:
    """One DPU layer: kind conv | convtranspose | add | concat | resize, reading int8 tensors `inputs`."""

    kind: str
    name: str
    inputs: list[str]
    output: str
    fp_out: int
    relu: bool = False
    w: np.ndarray | None = None
    fp_w: int = 0
    b: np.ndarray | None = None
    fp_b: int = 0
    attrs: dict = field(default_factory=dict)
    acc_dtype: type = np.float32


@dataclass
class DpuOutput:
    name: str
    tensor: str
    head: Head


class DpuEmulator:
    """Runs a dpu-pow2 QDQ model with DPU integer arithmetic; `run` takes float or int8 input."""

    def __init__(self, path: Path, input_name: str, ops: list[Op], fps: dict[str, int], outputs: list[DpuOutput],
                 dq_names: dict[str, str]):
        self.path, self.input_name, self.ops, self.fps, self.outputs = path, input_name, ops, fps, outputs
        self.dq_names = dq_names  # quantized tensor → its DequantizeLinear output in the QDQ model
        self.fp_in = fps[input_name]

    @classmethod
    def load(cls, path: str | Path) -> DpuEmulator:
        """Parse a dpu-pow2 QDQ model (ValueError naming what is not DPU-expressible)."""
        path = Path(path)
        return cls(path, *parse_qdq(path))

    @property
    def accumulators(self) -> dict[str, str]:
        """Per conv layer, the dtype its accumulation runs in (float32 wherever exact)."""
        return {op.name: np.dtype(op.acc_dtype).name for op in self.ops if op.w is not None}

    def run_int8(self, q: np.ndarray, keep: bool = False) -> dict[str, np.ndarray]:
        """int8 input (B, 1, N, N) at fix_point fp_in → int8 tensors: the head inputs, or all when `keep`."""
        env = {self.input_name: np.asarray(q, np.int8)}
        fps = self.fps
        last_use = self._last_use() if not keep else {}
        for k, op in enumerate(self.ops):
            xs = [env[t] for t in op.inputs]
            if op.kind in ("conv", "convtranspose"):
                a = op.attrs
                f = conv2d_acc if op.kind == "conv" else conv_transpose2d_acc
                extra = {"output_padding": a["output_padding"]} if op.kind == "convtranspose" else {}
                acc = f(xs[0], op.w, a["strides"], a["pads"], a["dilations"], dtype=op.acc_dtype, **extra)
                fp_x = fps[op.inputs[0]]
                shift_bias = fp_x + op.fp_w - op.fp_b
                env[op.output] = conv_requantize(acc, op.b, shift_bias, fp_x + op.fp_w - op.fp_out, op.relu)
            elif op.kind == "add":
                env[op.output] = eltwise_add(xs, [fps[t] for t in op.inputs], op.fp_out, op.relu)
            elif op.kind == "concat":
                parts = [requantize_shift(x, fps[t], op.fp_out) for x, t in zip(xs, op.inputs, strict=True)]
                env[op.output] = np.concatenate(parts, axis=op.attrs["axis"])
            else:
                env[op.output] = requantize_shift(resize_nearest(xs[0], op.attrs["factors"]), fps[op.inputs[0]],
                                                  op.fp_out)
            for t in op.inputs:  # free what no later layer reads
                if last_use.get(t) == k:
                    env.pop(t, None)
        return env

    def _last_use(self) -> dict[str, int]:
        keep = {o.tensor for o in self.outputs}
        last: dict[str, int] = {}
        for k, op in enumerate(self.ops):
            for t in op.inputs:
                if t not in keep:
                    last[t] = k
        return last

    def run(self, x: np.ndarray, out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Float (quantised half up at fp_in) or int8 input → float outputs, heads applied on the CPU side."""
        q = x if x.dtype == np.int8 else quantize_pow2(x, self.fp_in)
        env = self.run_int8(q)
        result = {} if out is None else out
        for o in self.outputs:
            deq = dequantize_pow2(env[o.tensor], self.fps[o.tensor])
            if out is None:
                result[o.name] = o.head.apply(deq)
            else:
                o.head.apply(deq, out=out[o.name][: len(q)])
        return result

    def compare_with_ort(self, x: np.ndarray, batch: int = 16) -> dict[str, dict[str, float]]:
        """Where ONNX Runtime's QDQ run (round half to even) differs from the DPU arithmetic, per tensor in LSB:
        max |difference| and the fraction of values that differ. The emulator is the DPU's truth."""
        import onnx

        from .calibration import run_intermediates

        model = onnx.load(str(self.path))
        tensors = [op.output for op in self.ops]
        names = [self.dq_names[t] for t in tensors]
        q = quantize_pow2(x, self.fp_in)
        stats = {t: [0, 0, 0] for t in tensors}  # max LSB, differing, total

        def feed(got: dict[str, np.ndarray], emu: dict[str, np.ndarray]) -> None:
            for t, n in zip(tensors, names, strict=True):
                ort_q = np.rint(got[n].astype(np.float64) * 2.0 ** self.fps[t]).astype(np.int64)
                d = np.abs(ort_q - emu[t].astype(np.int64))
                s = stats[t]
                s[0] = max(s[0], int(d.max(initial=0)))
                s[1] += int(np.count_nonzero(d))
                s[2] += d.size

        for s in range(0, len(x), batch):
            xb = dequantize_pow2(q[s:s + batch], self.fp_in)  # the same int8 input for both
            got = run_intermediates(model, xb, names, batch=len(xb))
            feed(got, self.run_int8(q[s:s + batch], keep=True))
        return {t: {"max_lsb": float(v[0]), "fraction_differing": v[1] / max(v[2], 1)} for t, v in stats.items()}


# --- reading the QDQ model ---------------------------------------------------------------------------------
def _scale_fix_point(node, inits: dict[str, np.ndarray]) -> int:
    s = np.asarray(inits.get(node.input[1]), np.float64)
    if s.size != 1:
        raise ValueError(f"{node.name}: per-channel scale; a DPU model has one power-of-two scale per tensor")
    fp = -np.log2(float(s.reshape(())))
    if fp != np.round(fp):
        raise ValueError(f"{node.name}: scale {float(s.reshape(()))} is not a power of two")
    if len(node.input) > 2 and node.input[2]:
        z = np.asarray(inits[node.input[2]])
        if z.dtype != np.int8 or np.any(z != 0):
            raise ValueError(f"{node.name}: zero point must be int8 0 (symmetric int8), got {z.dtype} {z}")
    return int(np.round(fp))


def parse_qdq(path: Path) -> tuple[str, list[Op], dict[str, int], list[DpuOutput], dict[str, str]]:
    """The DPU program of a dpu-pow2 QDQ model: input name, ops, fix_point per tensor, outputs, DQ names."""
    import onnx

    from .graph import consumers, initializers, resize_factors

    model = onnx.load(str(path))
    g = model.graph
    inits = initializers(model)
    for node in g.node:  # Constant nodes (a hand-made model) act as initializers
        if node.op_type == "Constant":
            inits[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    cons = consumers(model)
    fps: dict[str, int] = {}
    q_of: dict[str, str] = {}
    for n in g.node:
        if n.op_type == "QuantizeLinear":
            fps[n.input[0]] = _scale_fix_point(n, inits)
            q_of[n.output[0]] = n.input[0]
    alias: dict[str, str] = {}
    consts: dict[str, tuple[np.ndarray, int]] = {}
    for n in g.node:
        if n.op_type != "DequantizeLinear":
            continue
        src, fp = n.input[0], _scale_fix_point(n, inits)
        if src in inits:
            if inits[src].dtype != np.int8:
                raise ValueError(f"{path}: '{src}' is {inits[src].dtype}; the DPU keeps weights and biases int8 "
                                 "(an int32 bias comes from ORT's quantize_static, not the dpu-pow2 scheme)")
            consts[n.output[0]] = (inits[src], fp)
        elif src in q_of:
            if fp != fps[q_of[src]]:
                raise ValueError(f"{n.name}: dequantises '{q_of[src]}' at fix_point {fp}, quantised at "
                                 f"{fps[q_of[src]]}")
            alias[n.output[0]] = q_of[src]
        else:
            raise ValueError(f"{n.name}: dequantises '{src}', which is neither int8 constant nor a Q output")
    heads = split_heads(model)
    skip = {x for h in heads.values() for x in h.nodes if x}
    fused: set[str] = set()

    def act(t: str, who: str) -> str:
        if t not in alias:
            raise ValueError(f"{path}: '{who}' reads '{t}', which is not a dequantised int8 activation")
        return alias[t]

    def output(node, fuse: bool = True) -> tuple[str, bool]:
        t, nxt = node.output[0], cons.get(node.output[0], [])
        relu = fuse and len(nxt) == 1 and nxt[0].op_type == "Relu"
        if relu:
            fused.add(nxt[0].name)
            t = nxt[0].output[0]
        if t not in fps:
            raise ValueError(f"{path}: output '{t}' of '{node.name}' is not quantised; the DPU writes int8")
        return t, relu

    ops: list[Op] = []
    for n in g.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear", "Constant") or n.name in skip or n.name in fused:
            continue
        a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
        if n.op_type in ("Conv", "ConvTranspose"):
            if a.get("auto_pad", b"NOTSET") != b"NOTSET" or "output_shape" in a or int(a.get("group", 1)) != 1:
                raise ValueError(f"{n.name}: auto_pad, output_shape and groups are not emulated")
            if n.input[1] not in consts:
                raise ValueError(f"{n.name}: weight is not an int8 power-of-two DequantizeLinear")
            w, fp_w = consts[n.input[1]]
            b, fp_b = (None, 0)
            if len(n.input) > 2 and n.input[2]:
                if n.input[2] not in consts:
                    raise ValueError(f"{n.name}: bias is not an int8 power-of-two DequantizeLinear (the DPU "
                                     "stores int8 biases)")
                b, fp_b = consts[n.input[2]]
            out, relu = output(n)
            kind = n.op_type.lower()
            attrs = {"strides": tuple(a.get("strides", (1, 1))), "pads": tuple(a.get("pads", (0, 0, 0, 0))),
                     "dilations": tuple(a.get("dilations", (1, 1))),
                     "output_padding": tuple(a.get("output_padding", (0, 0)))}
            ops.append(Op(kind, n.name, [act(n.input[0], n.name)], out, fps[out], relu, w, fp_w, b, fp_b, attrs,
                          accumulator_dtype(w, 0 if kind == "conv" else 1)))
        elif n.op_type in ("Add", "Concat"):
            out, relu = output(n, fuse=n.op_type == "Add")
            ops.append(Op(n.op_type.lower(), n.name, [act(t, n.name) for t in n.input], out, fps[out], relu,
                          attrs={"axis": int(a.get("axis", 1))}))
        elif n.op_type == "Resize":
            out = n.output[0]
            if out not in fps:
                raise ValueError(f"{path}: output of '{n.name}' is not quantised")
            ops.append(Op("resize", n.name, [act(n.input[0], n.name)], out, fps[out],
                          attrs={"factors": resize_factors(n, inits)}))
        else:
            raise ValueError(f"{path}: node '{n.name}' ({n.op_type}) has no DPU emulation (Relu must follow a "
                             "Conv/ConvTranspose/Add as its only consumer)")
    input_name = g.input[0].name
    if input_name not in fps:
        raise ValueError(f"{path}: graph input '{input_name}' is not quantised")
    outputs = [DpuOutput(name, act(h.pre, name), h) for name, h in heads.items()]
    dq_names = {t: d for d, t in alias.items()}
    return input_name, ops, fps, outputs, dq_names
