"""Server-GPU backend: the ONNX graph interpreted as a torch module (FP32/FP16), CUDA graphs, pinned double buffers.

The HAL does not depend on training code: a small ONNX→torch interpreter covers the operators the CNN family
exports (Conv, ConvTranspose, Relu, Add, Mul, Tanh, Softplus, Sigmoid, Concat, BatchNormalization, nearest
Resize, …) with the ONNX file's own weights, so the numerics are those of the artifact that every other
backend runs.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from .base import Allocator, Backend, BackendUnavailable, InFlight, TensorSpec, Ticket
from .memory import _RangeIndex

log = logging.getLogger(__name__)

SLOTS = 2
SUPPORTED_OPS = ("Conv", "ConvTranspose", "Relu", "LeakyRelu", "Add", "Sub", "Mul", "Div", "Tanh", "Sigmoid",
                 "Softplus", "Concat", "BatchNormalization", "Identity", "Constant", "Resize")


def _attrs(node) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def onnx_to_torch(model):
    """An nn.Module computing the ONNX graph `model` (ModelProto) with its initializers as buffers."""
    import torch
    import torch.nn.functional as F
    from onnx import numpy_helper
    from torch import nn

    graph = model.graph
    bad = sorted({n.op_type for n in graph.node} - set(SUPPORTED_OPS))
    if bad:
        raise ValueError(f"ONNX→torch: unsupported operators {bad}; supported: {', '.join(SUPPORTED_OPS)}")

    def conv(x, w, b=None, *, pads=(0, 0, 0, 0), strides=(1, 1), dilations=(1, 1), group=1, auto_pad="NOTSET",
             **_):
        if auto_pad not in ("NOTSET", b"NOTSET", "VALID", b"VALID"):
            raise ValueError(f"Conv auto_pad={auto_pad} is not supported")
        pads = list(pads)
        if pads[:2] != pads[2:]:
            x = F.pad(x, (pads[1], pads[3], pads[0], pads[2]))
            pads = [0, 0, 0, 0]
        return F.conv2d(x, w, b, tuple(strides), tuple(pads[:2]), tuple(dilations), group)

    def conv_t(x, w, b=None, *, pads=(0, 0, 0, 0), strides=(1, 1), dilations=(1, 1), group=1,
               output_padding=(0, 0), **kw):
        if "output_shape" in kw:
            raise ValueError("ConvTranspose output_shape is not supported; export with pads")
        y = F.conv_transpose2d(x, w, b, tuple(strides), 0, tuple(output_padding), group, tuple(dilations))
        t, left, bot, right = pads
        return y[..., t:y.shape[-2] - bot, left:y.shape[-1] - right]

    def resize(x, roi=None, scales=None, sizes=None, *, mode="nearest", **kw):
        mode = mode.decode() if isinstance(mode, bytes) else mode
        ctm = kw.get("coordinate_transformation_mode", "half_pixel")
        ctm = ctm.decode() if isinstance(ctm, bytes) else ctm
        if mode != "nearest" or ctm != "asymmetric":
            raise ValueError(f"Resize mode={mode}/{ctm} is not supported (nearest/asymmetric only)")
        if sizes is not None and sizes.numel():
            return F.interpolate(x, size=tuple(int(s) for s in sizes[2:]), mode="nearest")
        return F.interpolate(x, scale_factor=tuple(float(s) for s in scales[2:]), mode="nearest")

    def bn(x, scale, bias, mean, var, *, epsilon=1e-5, **_):
        return F.batch_norm(x, mean, var, scale, bias, training=False, eps=epsilon)

    ops = {
        "Conv": conv, "ConvTranspose": conv_t, "Resize": resize, "BatchNormalization": bn,
        "Relu": lambda x: F.relu(x), "LeakyRelu": lambda x, alpha=0.01: F.leaky_relu(x, alpha),
        "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div, "Tanh": torch.tanh,
        "Sigmoid": torch.sigmoid, "Softplus": F.softplus, "Identity": lambda x: x,
        "Concat": lambda *xs, axis: torch.cat(xs, dim=axis),
    }

    class OnnxModule(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.slots: dict[str, str] = {}
            tensors = [(t.name, numpy_helper.to_array(t)) for t in graph.initializer]
            tensors += [(n.output[0], numpy_helper.to_array(_attrs(n)["value"]))
                        for n in graph.node if n.op_type == "Constant"]
            for i, (name, arr) in enumerate(tensors):
                self.register_buffer(f"t{i}", torch.from_numpy(np.array(arr)))
                self.slots[name] = f"t{i}"
            self.nodes = [(n.op_type, list(n.input), list(n.output), _attrs(n))
                          for n in graph.node if n.op_type != "Constant"]
            self.input_name = graph.input[0].name
            self.output_names = [o.name for o in graph.output]

        def forward(self, x):
            env = {self.input_name: x, "": None}
            for name, slot in self.slots.items():
                env[name] = getattr(self, slot)
            for op, ins, outs, attrs in self.nodes:
                env[outs[0]] = ops[op](*[env[i] for i in ins], **attrs)
            return tuple(env[o] for o in self.output_names)

    return OnnxModule()


class PinnedAllocator(Allocator):
    """Page-locked host memory from torch (pin_memory): non_blocking copies to the GPU are truly asynchronous."""

    name = "torch-pinned"
    zero_copy = False

    def __init__(self, pin: bool = True):
        self.pin = pin
        self._tensors: list[Any] = []
        self._index = _RangeIndex()

    def empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        import torch

        t = torch.empty(tuple(shape), dtype=torch.from_numpy(np.zeros(0, dtype)).dtype, pin_memory=self.pin)
        self._tensors.append(t)
        arr = t.numpy()
        self._index.add(arr.ctypes.data, max(arr.nbytes, 1), t)
        return arr

    def owns(self, array: np.ndarray) -> bool:
        return self._index.find(array.ctypes.data, array.nbytes) is not None

    def close(self) -> None:
        self._tensors.clear()
        self._index.clear()


class CudaBackend(Backend):
    """PyTorch on a server GPU: FP16 or FP32, CUDA-graph replay of the fixed batch, pinned host buffers, two streams.

    Options: ``device`` ("cuda:0"; "cpu" runs the same code path without streams/graphs, for tests),
    ``cuda_graphs`` (True). Partial batches are padded to the captured batch; only valid frames are copied.
    """

    name = "cuda"
    precisions = ("fp32", "fp16")
    profile = "cuda"

    @classmethod
    def probe(cls) -> None:
        try:
            import torch
        except ImportError as exc:
            raise BackendUnavailable(cls.name, f"torch not importable ({exc})",
                                     "pip install torch==2.13.0 (a CUDA build) on the GPU host") from exc
        if not torch.cuda.is_available():
            built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise BackendUnavailable(cls.name, f"torch {torch.__version__} sees no CUDA device ({built})",
                                     "on a GPU host install the CUDA build: pip install torch==2.13.0 --index-url "
                                     "https://download.pytorch.org/whl/cu126, and check that nvidia-smi lists the GPU")

    def __init__(self, model_path: str | Path, batch_size: int, precision: str = "fp32", **options: Any):
        super().__init__(model_path, batch_size, precision, **options)
        import onnx
        import torch

        self.torch = torch
        self.device = torch.device(options.get("device", "cuda:0"))
        self.gpu = self.device.type == "cuda"
        dtype = torch.float16 if precision == "fp16" else torch.float32
        module = onnx_to_torch(onnx.load(str(self.model_path))).eval().to(self.device, dtype)
        self._module = module

        def forward(x):
            return tuple(o.float() for o in module(x.to(dtype)))

        self._forward = forward
        dims = [d.dim_value for d in onnx.load(str(self.model_path), load_external_data=False)
                .graph.input[0].type.tensor_type.shape.dim]
        shape = (batch_size, *dims[1:])
        self._alloc = PinnedAllocator(pin=self.gpu)
        self._static_in = [torch.zeros(shape, device=self.device) for _ in range(SLOTS)]
        with torch.inference_mode():
            probe_out = forward(self._static_in[0])
        self._input_spec = TensorSpec(module.input_name, shape, np.dtype(np.float32))
        self._output_spec = tuple(TensorSpec(n, tuple(o.shape), np.dtype(np.float32))
                                  for n, o in zip(module.output_names, probe_out, strict=True))
        self._in_host = [self._alloc.empty(shape, np.float32) for _ in range(SLOTS)]
        self._out_host = [{s.name: self._alloc.empty(s.shape, np.float32) for s in self._output_spec}
                          for _ in range(SLOTS)]
        self._streams = [torch.cuda.Stream(self.device) for _ in range(SLOTS)] if self.gpu else [None] * SLOTS
        self._events = [torch.cuda.Event() for _ in range(SLOTS)] if self.gpu else [None] * SLOTS
        self._graphs: list[Any] = [None] * SLOTS
        self._static_out = [None] * SLOTS
        if self.gpu and options.get("cuda_graphs", True):
            self._capture()
        self._inflight = InFlight(SLOTS, self._finish)

    def _capture(self) -> None:
        torch = self.torch
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once, before capture
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode(), torch.cuda.stream(side):
            for _ in range(3):  # warm-up (cuDNN autotuning, allocator) must precede capture
                self._forward(self._static_in[0])
        torch.cuda.current_stream(self.device).wait_stream(side)
        for i in range(SLOTS):
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(graph):
                self._static_out[i] = self._forward(self._static_in[i])
            self._graphs[i] = graph

    def allocator(self) -> Allocator:
        """Pinned host memory: batches built here are copied to the GPU asynchronously, without staging."""
        return self._alloc

    def submit(self, inputs: np.ndarray, outputs: dict[str, np.ndarray], n: int | None = None) -> Ticket:
        torch = self.torch
        n = self.check_batch(inputs, outputs, n)
        slot = self._inflight.next_slot()
        src = inputs[:n]
        if not self._alloc.owns(src):
            np.copyto(self._in_host[slot][:n], src)
            src = self._in_host[slot][:n]
        copy_back = []
        stream = self._streams[slot]
        with torch.inference_mode(), (torch.cuda.stream(stream) if self.gpu else contextlib.nullcontext()):
            static_in = self._static_in[slot]
            static_in[:n].copy_(torch.from_numpy(src), non_blocking=self.gpu)
            static_in[n:].zero_()  # padding rows: deterministic, never NaN
            outs = self._static_out[slot] if self._graphs[slot] is not None else None
            if outs is not None:
                self._graphs[slot].replay()
            else:
                outs = self._forward(static_in)
            for s, o in zip(self._output_spec, outs, strict=True):
                dst = outputs[s.name][:n]
                host = dst if self._alloc.owns(dst) else self._out_host[slot][s.name][:n]
                torch.from_numpy(host).copy_(o[:n], non_blocking=self.gpu)
                if host is not dst:
                    copy_back.append((dst, host))
            if self.gpu:
                self._events[slot].record(stream)
        return self._inflight.issue(slot, n, outputs, copy_back=copy_back)

    def _finish(self, ticket: Ticket) -> None:
        if self.gpu:
            self._events[ticket.extra["slot"]].synchronize()
        for dst, src in ticket.extra["copy_back"]:
            np.copyto(dst, src)

    def wait(self, ticket: Ticket) -> dict[str, np.ndarray]:
        return self._inflight.complete(ticket)

    def telemetry(self) -> dict[str, Any]:
        from .power import cpu_telemetry, nvidia_telemetry

        return nvidia_telemetry(self.device.index or 0) if self.gpu else cpu_telemetry()

    def close(self) -> None:
        self._inflight.drain()
        self._graphs = [None] * SLOTS
        self._static_out = [None] * SLOTS
        self._alloc.close()

