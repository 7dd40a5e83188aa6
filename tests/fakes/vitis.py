"""Fake `xir`, `vart` and `pyxrt` modules: a JSON "xmodel" whose DPU subgraph runs an ONNX body with int8 fix_point I/O.

Mirrors the Vitis AI 2.5 Python API as documented in Xilinx/Vitis-AI docsrc (pydoc create_runner.py,
execute_async.py, wait.py, runner_example.py) and reference/deployment-toolchains.md ("Vitis AI 2.5 flow"):
xir.Graph.deserialize(path) → get_root_subgraph() → toposort_child_subgraph() → Subgraph.name / has_attr /
get_attr("device"); vart.Runner.create_runner(subgraph, "run") → get_input_tensors() / get_output_tensors()
(Tensor.name, .dims NHWC, .dtype "xint8", get_attr("fix_point")), execute_async(list of C-contiguous numpy
arrays, list) → (job id, status), wait((job id, status)) → status. pyxrt mirrors XRT's pybind module
(src/python/pybind11/src/pyxrt.cpp): enumerate_devices(), device(i).get_info(xrt_info_device.X) → JSON string.

The DPU computes at wait() time: int8 input · 2**-fp_in → ONNX body (ONNX Runtime) → floor(y · 2**fp_out + 0.5)
saturated to int8 (DPU round-half-up), so buffers changed or dropped before wait() show up as wrong results.
"""

from __future__ import annotations

import enum
import itertools
import json
import types
from pathlib import Path

import numpy as np

# --- the fake xmodel file --------------------------------------------------------------------------------


def write_xmodel(path: Path, body_onnx: Path, fix_in: int, fix_out: dict[str, int], batch: int = 4,
                 dtype: str = "xint8", dpu_subgraphs: int = 1) -> Path:
    """A JSON stand-in for a compiled xmodel: USER input, `dpu_subgraphs` DPU subgraphs, CPU heads."""
    import onnx

    graph = onnx.load(str(body_onnx)).graph
    n = graph.input[0].type.tensor_type.shape.dim[-1].dim_value
    inp = {"name": f"{graph.input[0].name}__fix", "dims": [batch, n, n, 1], "dtype": dtype, "fix_point": fix_in}
    outs = []
    for o in graph.output:
        m = o.type.tensor_type.shape.dim[-1].dim_value
        outs.append({"name": f"Net__{o.name}__fix", "onnx": o.name, "dims": [batch, m, m, 1], "dtype": dtype,
                     "fix_point": fix_out[o.name]})
    subgraphs = [{"name": "subgraph_diffraction", "device": "USER"}]
    subgraphs += [{"name": f"subgraph_body_{k}", "device": "DPU", "onnx": str(body_onnx), "inputs": [inp],
                   "outputs": outs} for k in range(dpu_subgraphs)]
    subgraphs.append({"name": "subgraph_heads", "device": "CPU"})
    path.write_text(json.dumps({"fake_xmodel": 1, "subgraphs": subgraphs}))
    return path


# --- xir -------------------------------------------------------------------------------------------------
class Tensor:
    def __init__(self, d: dict):
        self._d = d
        self.name, self.dims, self.dtype = d["name"], list(d["dims"]), d["dtype"]

    def has_attr(self, key: str) -> bool:
        return key in self._d and key not in ("name", "dims", "dtype")

    def get_attr(self, key: str):
        if not self.has_attr(key):
            raise RuntimeError(f"tensor {self.name} has no attribute {key}")
        return self._d[key]


class Subgraph:
    def __init__(self, d: dict, children: list[Subgraph] | None = None):
        self._d, self._children = d, children or []
        self.name = d["name"]

    def has_attr(self, key: str) -> bool:
        return key in self._d and key != "name"

    def get_attr(self, key: str):
        return self._d[key]

    def toposort_child_subgraph(self) -> list[Subgraph]:
        return list(self._children)

    @property
    def is_root(self) -> bool:
        return bool(self._children)


class Graph:
    def __init__(self, d: dict):
        self._root = Subgraph({"name": "root"}, [Subgraph(s) for s in d["subgraphs"]])

    @staticmethod
    def deserialize(path: str) -> Graph:
        if not isinstance(path, str):
            raise TypeError(f"deserialize(arg0: str), got {type(path).__name__}")
        data = json.loads(Path(path).read_text())
        if data.get("fake_xmodel") != 1:
            raise RuntimeError(f"{path}: not an xmodel")
        return Graph(data)

    def get_root_subgraph(self) -> Subgraph:
        return self._root


xir = types.ModuleType("xir")
xir.Graph, xir.Subgraph, xir.Tensor = Graph, Subgraph, Tensor
xir.__doc__ = "fake xir (tests/fakes/vitis.py)"


# --- vart ------------------------------------------------------------------------------------------------
_NP = {"xint8": np.int8, "int8": np.int8, "float32": np.float32}


class Runner:
    _ids = itertools.count(1)

    def __init__(self, subgraph: Subgraph):
        d = subgraph._d
        self._in = [Tensor(t) for t in d["inputs"]]
        self._out = [Tensor(t) for t in d["outputs"]]
        self._onnx = d["onnx"]
        self._session = None
        self._jobs: dict[int, tuple[list, list]] = {}
        self.executed = 0

    @staticmethod
    def create_runner(subgraph: Subgraph, mode: str) -> Runner:
        if not isinstance(subgraph, Subgraph) or mode != "run":
            raise TypeError("create_runner(subgraph: xir.Subgraph, mode: str = 'run')")
        if str(subgraph.get_attr("device")).upper() != "DPU":
            raise RuntimeError(f"subgraph {subgraph.name} is not a DPU subgraph")
        return Runner(subgraph)

    def get_input_tensors(self) -> list[Tensor]:
        return list(self._in)

    def get_output_tensors(self) -> list[Tensor]:
        return list(self._out)

    @staticmethod
    def _check(arrays, tensors, what: str) -> None:
        if not isinstance(arrays, list) or len(arrays) != len(tensors):
            raise TypeError(f"{what}: a list of {len(tensors)} numpy arrays")
        for a, t in zip(arrays, tensors, strict=True):
            if not isinstance(a, np.ndarray) or not a.flags.c_contiguous:
                raise ValueError(f"{what}: buffer for {t.name} must be a C-contiguous numpy array")
            if a.dtype != _NP[t.dtype] or tuple(a.shape) != tuple(t.dims):
                raise ValueError(f"{what}: {t.name} needs {_NP[t.dtype].__name__}{tuple(t.dims)}, "
                                 f"got {a.dtype}{a.shape}")

    def execute_async(self, inputs: list, outputs: list) -> tuple[int, int]:
        self._check(inputs, self._in, "execute_async inputs")
        self._check(outputs, self._out, "execute_async outputs")
        job = next(self._ids)
        self._jobs[job] = (inputs, outputs)
        return job, 0

    def wait(self, jobid_time: tuple[int, int]) -> int:
        if not isinstance(jobid_time, tuple) or len(jobid_time) != 2:
            raise TypeError("wait(jobid_time: tuple[int, int])")
        inputs, outputs = self._jobs.pop(jobid_time[0])
        if self._session is None:
            import onnxruntime as ort

            self._session = ort.InferenceSession(self._onnx, providers=["CPUExecutionProvider"])
        t_in = self._in[0]
        x = inputs[0].astype(np.float32)
        if t_in.dtype != "float32":
            x *= np.float32(2.0 ** -t_in.get_attr("fix_point"))
        feed = {self._session.get_inputs()[0].name: np.ascontiguousarray(x.transpose(0, 3, 1, 2))}
        results = self._session.run([t._d["onnx"] for t in self._out], feed)
        for t, r, dst in zip(self._out, results, outputs, strict=True):
            y = r.transpose(0, 2, 3, 1)
            if t.dtype == "float32":
                dst[...] = y
            else:
                dst[...] = np.clip(np.floor(y * np.float32(2.0 ** t.get_attr("fix_point")) + 0.5), -128, 127)
        self.executed += 1
        return 0


vart = types.ModuleType("vart")
vart.Runner = Runner
vart.__doc__ = "fake vart (tests/fakes/vitis.py)"


# --- pyxrt -----------------------------------------------------------------------------------------------
class xrt_info_device(enum.Enum):  # noqa: N801
    bdf = "bdf"
    name = "name"
    electrical = "electrical"
    thermal = "thermal"
    platform = "platform"


ELECTRICAL = {"power_rails": [{"id": "12v_pex", "voltage": {"volts": "12.1"}, "current": {"amps": "2.0"}}],
              "power_consumption_max_watts": "225.000000", "power_consumption_watts": "24.500000",
              "power_consumption_warning": "false"}
THERMAL = {"thermals": [{"location_id": "fpga0", "description": "FPGA", "temp_C": "41", "is_present": "true"},
                        {"location_id": "int_vcc", "description": "Int Vcc", "temp_C": "0", "is_present": "false"}]}


class _XrtDevice:
    def __init__(self, index: int | str):
        if isinstance(index, int) and index >= pyxrt.DEVICES:
            raise RuntimeError(f"No such device with index '{index}'")
        self.index = index

    def get_info(self, key: xrt_info_device) -> str:
        return {xrt_info_device.bdf: "0000:5e:00.1", xrt_info_device.name: "xilinx_u250_gen3x16_xdma_shell_3_1",
                xrt_info_device.electrical: json.dumps(ELECTRICAL), xrt_info_device.thermal: json.dumps(THERMAL),
                xrt_info_device.platform: "{}"}[key]


pyxrt = types.ModuleType("pyxrt")
pyxrt.DEVICES = 1
pyxrt.device = _XrtDevice
pyxrt.xrt_info_device = xrt_info_device
pyxrt.enumerate_devices = lambda: pyxrt.DEVICES
pyxrt.__doc__ = "fake pyxrt (tests/fakes/vitis.py)"
