"""Alveo backend: the xmodel's DPU subgraph through VART (Vitis AI 2.5, DPUCADF8H), fix_point I/O, heads on the CPU.

xir.Graph.deserialize → root subgraph → children with device "DPU" (exactly one) → vart.Runner.create_runner(sg,
"run") → int8 NHWC tensors with fix_point (input q = clip(floor(x·2**fp + 0.5)), output y = q·2**-fp) →
execute_async(inputs, outputs) → (job id, status) → wait(job). The DPU batch is the input tensor's first dim
(4 on DPUCADF8H); partial jobs are zero-padded. tanh·π and softplus/sigmoid heads are not DPU operators: they
run on the host CPU (numpy) after dequantisation, taken from the ONNX model the xmodel was compiled from.
"""

from __future__ import annotations

import glob
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from .base import Backend, BackendUnavailable, InFlight, TensorSpec, Ticket

log = logging.getLogger(__name__)

SLOTS = 2
FIX_VAI = ("run inside the Vitis AI 2.5 container (xilinx/vitis-ai-cpu:2.5.x, conda activate vitis-ai-pytorch) on "
           "a host prepared with setup/alveo/install.sh (XRT 2.13, U250 shell xilinx_u250_gen3x16_xdma_3.1)")
FIX_FW = ("source setup/alveo/setup.sh DPUCADF8H inside the container: it sets XLNX_VART_FIRMWARE to the "
          "DPUCADF8H xclbin under /opt/xilinx/overlaybins")
FIX_DEV = ("install XRT 2.13 and flash the xilinx_u250_gen3x16_xdma_3.1 shell (setup/alveo/install.sh); "
           "`xbutil examine` must list the card")
FIRMWARE_DIRS = ("/opt/xilinx/overlaybins/DPUCADF8H", "/opt/xilinx/overlaybins/dpuv3int8")
NAMED_HEADS = {"softplus": [("Softplus", None, False)], "sigmoid": [("Sigmoid", None, False)],
               "pi_tanh": [("Tanh", None, False), ("Mul", math.pi, False)], "identity": []}


def xrt_device_count() -> tuple[int, str]:
    """Alveo cards visible to XRT: pyxrt when importable, else the xocl driver's PCI functions in sysfs."""
    try:
        import pyxrt
    except ImportError:
        n = len(glob.glob("/sys/bus/pci/drivers/xocl/0000:*"))
        return n, "" if n else "pyxrt not importable and no xocl PCI function under /sys/bus/pci/drivers/xocl"
    if hasattr(pyxrt, "enumerate_devices"):
        n = int(pyxrt.enumerate_devices())
        return n, "" if n else "pyxrt.enumerate_devices() == 0"
    try:
        pyxrt.device(0)
    except Exception as exc:  # pyxrt raises plain RuntimeError when no card is present
        return 0, f"pyxrt.device(0): {exc}"
    return 1, ""


def _parse_heads(spec: dict[str, str]):
    from ..quantization.qdq import Head

    heads = {}
    for out, kind in spec.items():
        base, _, scale = kind.partition("*")
        if base not in NAMED_HEADS:
            raise ValueError(f"head '{kind}' for '{out}': use one of {list(NAMED_HEADS)} (sigmoid*R scales)")
        ops = list(NAMED_HEADS[base]) + ([("Mul", float(scale), False)] if scale else [])
        heads[out] = Head(out, out, ops=ops)
    return heads


class AlveoBackend(Backend):
    """Alveo U250 DPU (DPUCADF8H) through VART: int8 fix_point tensors, DPU batch, heads on the host CPU.

    The model is the compiled .xmodel (or the .onnx with its .xmodel beside it). Options: ``xmodel`` (path),
    ``heads`` ({output: "softplus" | "sigmoid*R" | "pi_tanh" | "identity"}; default: read from the ONNX
    model), ``output_map`` ({output: DPU tensor name}; default: by name, then by order). Not thread-safe:
    VART wants one runner per thread, so open one backend per thread.
    """

    name = "alveo"
    precisions = ("int8",)
    profile = "alveo-u250"

    @classmethod
    def probe(cls) -> None:
        try:
            import vart  # noqa: F401
            import xir  # noqa: F401
        except ImportError as exc:
            raise BackendUnavailable(cls.name, f"xir/vart not importable ({exc})", FIX_VAI) from exc
        firmware = os.environ.get("XLNX_VART_FIRMWARE", "")
        if not (firmware and os.path.exists(firmware)) and not any(os.path.isdir(d) for d in FIRMWARE_DIRS):
            raise BackendUnavailable(cls.name, "no DPUCADF8H xclbin (XLNX_VART_FIRMWARE unset or missing, none in "
                                     f"{' or '.join(FIRMWARE_DIRS)})", FIX_FW)
        n, why = xrt_device_count()
        if n == 0:
            raise BackendUnavailable(cls.name, f"no Alveo card visible to XRT ({why})", FIX_DEV)

    def __init__(self, model_path: str | Path, batch_size: int, precision: str = "int8", **options: Any):
        super().__init__(model_path, batch_size, precision, **options)
        import vart
        import xir

        xmodel, onnx_path = self._paths()
        graph = xir.Graph.deserialize(str(xmodel))
        children = graph.get_root_subgraph().toposort_child_subgraph()
        dev = {s.name: s.get_attr("device").upper() if s.has_attr("device") else "?" for s in children}
        dpu = [s for s in children if dev[s.name] == "DPU"]
        if len(dpu) != 1:
            raise ValueError(
                f"{xmodel}: {len(dpu)} DPU subgraphs ({[s.name for s in dpu]}); expected exactly one. An operator "
                "the DPU lacks (e.g. a stride-2 deconvolution on DPUCADF8H) splits the body and drops the rest to "
                f"the CPU: recompile (nearest-upsample + conv decoder). Subgraphs: {dev}")
        cpu = [name for name, d in dev.items() if d == "CPU"]
        if cpu:
            log.info("%s: CPU subgraphs %s (the heads) are replaced by our numpy heads", self.name, cpu)
        self.runner = vart.Runner.create_runner(dpu[0], "run")
        ins, outs = self.runner.get_input_tensors(), self.runner.get_output_tensors()
        if len(ins) != 1:
            raise ValueError(f"{xmodel}: DPU subgraph has {len(ins)} inputs, expected 1")
        self.dpu_batch = int(ins[0].dims[0])
        self._in = self._io_format(ins[0])
        self._outs = [self._io_format(t) for t in outs]
        heads = _parse_heads(options["heads"]) if options.get("heads") else self._onnx_heads(onnx_path)
        self._out_names = list(heads)
        self._heads = [heads[k] for k in self._out_names]
        self._dpu_index = self._map_outputs(outs, options.get("output_map") or {})
        n_in = tuple(ins[0].dims[1:])
        in_dtype, fp = (np.dtype(np.int8), self._in[1]) if self._in[0] == np.int8 else (np.dtype(np.float32), None)
        self._input_spec = TensorSpec(ins[0].name, (batch_size, n_in[2], n_in[0], n_in[1]), in_dtype,
                                      scale=2.0**-fp if fp is not None else 1.0, fix_point=fp)
        self._output_spec = tuple(
            TensorSpec(name, (batch_size, 1, *outs[i].dims[1:3]), np.dtype(np.float32))
            for name, i in zip(self._out_names, self._dpu_index, strict=True))
        self.jobs = -(-batch_size // self.dpu_batch)
        # Per slot and job: VART wants lists of C-contiguous arrays of exactly the tensor dims.
        self._in_bufs = [[np.zeros(tuple(ins[0].dims), self._in[0]) for _ in range(self.jobs)] for _ in range(SLOTS)]
        self._out_bufs = [[[np.zeros(tuple(t.dims), f[0]) for t, f in zip(outs, self._outs, strict=True)]
                           for _ in range(self.jobs)] for _ in range(SLOTS)]
        self._inflight = InFlight(SLOTS, self._finish)

    # --- opening helpers ------------------------------------------------------------------------------
    def _paths(self) -> tuple[Path, Path | None]:
        p = self.model_path
        xmodel = Path(self.options["xmodel"]) if self.options.get("xmodel") else (
            p if p.suffix == ".xmodel" else p.with_suffix(".xmodel"))
        if not xmodel.is_file():
            raise FileNotFoundError(f"no compiled xmodel at {xmodel}: compile the model for DPUCADF8H "
                                    "(firmware_scripts/alveo: vai_q quantize + vai_c_xir) and put it beside the ONNX")
        onnx_path = p if p.suffix == ".onnx" else xmodel.with_suffix(".onnx")
        return xmodel, onnx_path if onnx_path.is_file() else None

    def _io_format(self, tensor: Any) -> tuple[type, int | None]:
        dtype = str(tensor.dtype).lower()
        dims = tuple(tensor.dims)
        if len(dims) != 4 or dims[3] != 1:
            raise ValueError(f"DPU tensor '{tensor.name}' has dims {dims}; expected NHWC with one channel")
        if dtype in ("xint8", "int8"):
            if not tensor.has_attr("fix_point"):
                raise ValueError(f"DPU tensor '{tensor.name}' is int8 without a fix_point attribute")
            return np.int8, int(tensor.get_attr("fix_point"))
        if dtype == "float32":  # DPUCADF8H cloud runners quantise inside rt-engine
            return np.float32, None
        raise ValueError(f"DPU tensor '{tensor.name}' has dtype {dtype}; expected xint8/int8 or float32")

    def _onnx_heads(self, onnx_path: Path | None):
        if onnx_path is None:
            raise ValueError(f"{self.name}: the heads run on the CPU and are read from the ONNX model; put the "
                             ".onnx beside the .xmodel or pass heads={'amplitude': 'softplus', 'phase': 'pi_tanh'}")
        import onnx

        from ..quantization.qdq import split_heads

        return split_heads(onnx.load(str(onnx_path)))

    def _map_outputs(self, outs: list[Any], explicit: dict[str, str]) -> list[int]:
        names = [t.name for t in outs]
        if len(outs) != len(self._out_names):
            raise ValueError(f"{self.name}: DPU has outputs {names}; the model has {self._out_names}")
        index = []
        for out in self._out_names:
            want = explicit.get(out)
            hits = ([i for i, n in enumerate(names) if n == want] if want else
                    [i for i, n in enumerate(names) if out[:3].lower() in n.lower()])
            index.append(hits[0] if len(hits) == 1 else -1)
        if -1 in index or len(set(index)) != len(index):
            if explicit:
                raise ValueError(f"{self.name}: output_map {explicit} does not match DPU outputs {names}")
            log.warning("%s: cannot match DPU outputs %s to %s by name; using their order", self.name, names,
                        self._out_names)
            index = list(range(len(names)))
        return index

    # --- the contract --------------------------------------------------------------------------------
    def submit(self, inputs: np.ndarray, outputs: dict[str, np.ndarray], n: int | None = None) -> Ticket:
        from ..quantization.qdq import quantize_pow2

        spec = self._input_spec
        n = self.check_batch(inputs, outputs, n, (spec.dtype, np.float32))
        slot = self._inflight.next_slot()
        db, jobs = self.dpu_batch, []
        for j in range(-(-n // db)):
            lo, valid = j * db, min(db, n - j * db)
            chunk = inputs[lo:lo + valid]
            buf = self._in_bufs[slot][j]
            if valid == db and chunk.dtype == buf.dtype and chunk.flags.c_contiguous:
                buf = chunk.reshape(buf.shape)  # a full job reads the caller's batch in place
            else:
                staged = buf.reshape(db, *spec.shape[1:])
                if chunk.dtype == buf.dtype:
                    staged[:valid] = chunk
                else:  # float32 handed to an int8 DPU: quantise as the DPU rounds (half up, saturate)
                    quantize_pow2(chunk, spec.fix_point, out=staged[:valid])
                staged[valid:] = 0
            job = self.runner.execute_async([buf], self._out_bufs[slot][j])
            if job[1] != 0:
                raise RuntimeError(f"{self.name}: execute_async returned status {job[1]}")
            jobs.append((job, j, valid, buf))  # keep `buf` referenced until the DPU is done with it
        return self._inflight.issue(slot, n, outputs, jobs=jobs)

    def _finish(self, ticket: Ticket) -> None:
        from ..quantization.qdq import dequantize_pow2

        slot = ticket.extra["slot"]
        for job, j, valid, _buf in ticket.extra["jobs"]:
            status = self.runner.wait(job)
            if status != 0:
                raise RuntimeError(f"{self.name}: DPU job {job[0]} finished with status {status}")
            lo = j * self.dpu_batch
            for name, head, k in zip(self._out_names, self._heads, self._dpu_index, strict=True):
                raw = self._out_bufs[slot][j][k][:valid]
                fp = self._outs[k][1]
                x = dequantize_pow2(raw, fp) if fp is not None else raw
                head.apply(x.reshape(valid, 1, *raw.shape[1:3]), out=ticket.outputs[name][lo:lo + valid])

    def wait(self, ticket: Ticket) -> dict[str, np.ndarray]:
        return self._inflight.complete(ticket)

    def telemetry(self) -> dict[str, Any]:
        from .power import xrt_telemetry

        return xrt_telemetry(int(self.options.get("device", 0)))

    def close(self) -> None:
        if self.runner is not None:
            self._inflight.drain()
        self.runner = None
