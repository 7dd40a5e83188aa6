"""ONNX graph plumbing for quantization: constant folding of exporter artefacts, the layer list an int8 target
sees (conv + fused ReLU, residual add, concat, resize), Q/DQ insertion, and exposing intermediate tensors."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Ops a DPU-style integer body may contain; everything else must be part of a float head.
BODY_OPS = ("Conv", "ConvTranspose", "Relu", "Add", "Concat", "Resize")


@dataclass
class Layer:
    """One integer operation: `inputs` are activation tensors, `output` the tensor that gets quantized
    (the ReLU's output when a ReLU is fused), `nodes` the ONNX nodes it covers."""

    kind: str  # conv | convtranspose | add | concat | resize
    name: str
    inputs: list[str]
    output: str
    nodes: list[str]
    weight: str | None = None
    bias: str | None = None
    relu: bool = False
    attrs: dict = field(default_factory=dict)


def load_float_model(path: str | Path):
    """The FP32 model with exporter artefacts folded: Identity-of-initializer and Constant nodes become
    initializers, so every weight is an initializer of its own (the exporter shares equal tensors)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    keep = []
    for node in g.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            arr = numpy_helper.to_array(inits[node.input[0]])
        elif node.op_type == "Constant" and any(a.name == "value" for a in node.attribute):
            arr = numpy_helper.to_array(next(a.t for a in node.attribute if a.name == "value"))
        else:
            keep.append(node)
            continue
        t = numpy_helper.from_array(np.array(arr), node.output[0])
        g.initializer.append(t)
        inits[t.name] = t
    del g.node[:]
    g.node.extend(keep)
    for i, node in enumerate(g.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    return model


def initializers(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def consumers(model) -> dict[str, list]:
    out: dict[str, list] = {}
    for node in model.graph.node:
        for i in node.input:
            out.setdefault(i, []).append(node)
    return out


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def integer_layers(model, head_nodes: set[str]) -> list[Layer]:
    """The body as integer layers in graph order; ReLUs that are a conv's or add's only consumer are fused.

    Raises ValueError naming any op an integer accelerator body cannot hold (outside the float heads).
    """
    inits = initializers(model)
    cons = consumers(model)
    graph_outputs = {o.name for o in model.graph.output}
    fused: set[str] = set()
    layers: list[Layer] = []
    for node in model.graph.node:
        if node.name in head_nodes or node.name in fused:
            continue
        op = node.op_type
        if op not in BODY_OPS:
            raise ValueError(f"node '{node.name}' ({op}) is neither an integer body op {BODY_OPS} nor part of "
                             "an output head; the int8 schemes cannot place it")
        if op == "Relu":
            raise ValueError(f"ReLU '{node.name}' does not follow a Conv/ConvTranspose/Add as its only consumer; "
                             "a DPU fuses ReLU into the preceding layer only")
        out = node.output[0]
        nxt = cons.get(out, [])
        relu = len(nxt) == 1 and nxt[0].op_type == "Relu" and out not in graph_outputs and op != "Concat" \
            and op != "Resize"
        if relu:
            fused.add(nxt[0].name)
        layer = Layer(kind=op.lower(), name=node.name, inputs=[], output=nxt[0].output[0] if relu else out,
                      nodes=[node.name] + ([nxt[0].name] if relu else []), relu=relu, attrs=_attrs(node))
        if op in ("Conv", "ConvTranspose"):
            if node.input[1] not in inits:
                raise ValueError(f"{op} '{node.name}': weight '{node.input[1]}' is not a constant")
            layer.inputs = [node.input[0]]
            layer.weight = node.input[1]
            if len(node.input) > 2 and node.input[2]:
                if node.input[2] not in inits:
                    raise ValueError(f"{op} '{node.name}': bias '{node.input[2]}' is not a constant")
                layer.bias = node.input[2]
            if int(layer.attrs.get("group", 1)) != 1:
                raise ValueError(f"{op} '{node.name}': grouped convolution is not supported")
        elif op == "Add":
            if any(i in inits for i in node.input):
                raise ValueError(f"Add '{node.name}' adds a constant; only residual (tensor + tensor) adds are "
                                 "integer layers")
            layer.inputs = list(node.input)
        elif op == "Concat":
            layer.inputs = list(node.input)
        else:  # Resize
            layer.inputs = [node.input[0]]
            layer.attrs["factors"] = resize_factors(node, inits)
        layers.append(layer)
    return layers


def resize_factors(node, inits: dict[str, np.ndarray]) -> tuple[int, int]:
    """Integer (h, w) factors of a nearest-neighbour Resize that repeats pixels (floor, asymmetric)."""
    a = _attrs(node)
    mode = a.get("mode", b"nearest")
    ctm = a.get("coordinate_transformation_mode", b"half_pixel")
    nearest = a.get("nearest_mode", b"round_prefer_floor")
    scales = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    ok = mode == b"nearest" and ctm == b"asymmetric" and nearest == b"floor" and scales is not None
    if ok:
        s = [float(v) for v in np.asarray(scales).reshape(-1)]
        ok = len(s) == 4 and s[:2] == [1.0, 1.0] and all(v >= 1 and v == math.floor(v) for v in s[2:])
    if not ok:
        raise ValueError(f"Resize '{node.name}': only nearest, asymmetric, floor, integer scales (pixel "
                         "repetition) is an integer layer")
    return int(s[2]), int(s[3])


def insert_qdq(model, tensor: str, scale: np.ndarray, zero_point: np.ndarray, axis: int | None = None,
               rewire: bool = True) -> str:
    """Put QuantizeLinear → DequantizeLinear after `tensor`; every consumer reads the DQ output (returned)."""
    from onnx import helper, numpy_helper

    g = model.graph
    q_out, dq_out = f"{tensor}_quantized", f"{tensor}_dequantized"
    s_name, z_name = f"{tensor}_scale", f"{tensor}_zero_point"
    g.initializer.extend([numpy_helper.from_array(np.asarray(scale, np.float32), s_name),
                          numpy_helper.from_array(np.asarray(zero_point, np.int8), z_name)])
    kw = {} if axis is None else {"axis": axis}
    if rewire:
        for node in g.node:
            for k, i in enumerate(node.input):
                if i == tensor:
                    node.input[k] = dq_out
        for o in g.output:
            if o.name == tensor:
                raise ValueError(f"cannot quantize graph output '{tensor}'")
    q = helper.make_node("QuantizeLinear", [tensor, s_name, z_name], [q_out], name=f"{tensor}_QuantizeLinear", **kw)
    dq = helper.make_node("DequantizeLinear", [q_out, s_name, z_name], [dq_out],
                          name=f"{tensor}_DequantizeLinear", **kw)
    _insert_after_producer(model, tensor, [q, dq])
    return dq_out


def quantize_initializer(model, name: str, q: np.ndarray, scale: np.ndarray, axis: int | None = None) -> str:
    """Replace float initializer `name` by int8 `q` behind a DequantizeLinear whose output keeps every consumer."""
    from onnx import helper, numpy_helper

    g = model.graph
    for k, t in enumerate(g.initializer):
        if t.name == name:
            del g.initializer[k]
            break
    qn, sn, zn = f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"
    zero = np.zeros(np.shape(scale), np.int8)
    g.initializer.extend([numpy_helper.from_array(np.asarray(q, np.int8), qn),
                          numpy_helper.from_array(np.asarray(scale, np.float32), sn),
                          numpy_helper.from_array(zero, zn)])
    kw = {} if axis is None else {"axis": axis}
    g.node.insert(0, helper.make_node("DequantizeLinear", [qn, sn, zn], [name], name=f"{name}_DequantizeLinear",
                                      **kw))
    return name


def _insert_after_producer(model, tensor: str, nodes: list) -> None:
    g = model.graph
    pos = 0
    for k, node in enumerate(g.node):
        if tensor in node.output:
            pos = k + 1
            break
    for j, n in enumerate(nodes):
        g.node.insert(pos + j, n)


def expose(model, names: list[str]):
    """Copy of `model` with `names` added as graph outputs (types from shape inference) for intermediate runs."""
    import onnx
    from onnx import helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    inferred = onnx.shape_inference.infer_shapes(m)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    types.update({v.name: v.type.tensor_type.elem_type for v in m.graph.input})
    have = {o.name for o in m.graph.output}
    for name in names:
        if name not in have:
            m.graph.output.append(helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT),
                                                                None))
            have.add(name)
    return m


def session(model, optimize: bool = False):
    """ONNX Runtime CPU session on an in-memory model (no graph optimisation unless asked: reference numerics)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
