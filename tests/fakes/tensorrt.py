"""Fake `tensorrt` 10.x: the build and name-based runtime API, running the parsed ONNX with ONNX Runtime.

Mirrors the TensorRT 10 Python API as summarised in reference/deployment-toolchains.md ("TensorRT 10.x Python
API") from NVIDIA's TensorRT 10 Python API docs: Logger, Builder(logger).create_network(flags) with
NetworkDefinitionCreationFlag.STRONGLY_TYPED, OnnxParser(network, logger).parse(bytes) / num_errors /
get_error(i), create_builder_config().set_memory_pool_limit(MemoryPoolType.WORKSPACE, n),
create_optimization_profile().set_shape(name, min, opt, max), add_optimization_profile,
build_serialized_network(network, config) → IHostMemory or None, Runtime(logger).deserialize_cuda_engine,
ICudaEngine.num_io_tensors / get_tensor_name / get_tensor_mode / get_tensor_dtype / get_tensor_shape /
create_execution_context, IExecutionContext.set_optimization_profile_async / set_input_shape /
get_tensor_shape / set_tensor_address / execute_async_v3, nptype.

The removed TensorRT 8 API is absent on purpose (build_engine, max_workspace_size, max_batch_size,
execute_async_v2, execute_v2, get_binding_*, binding_is_input, num_bindings) and objects use __slots__, so
assigning `config.max_workspace_size` fails as on TensorRT 10. Checks: argument types, profiles covering
dynamic inputs, one live context per optimisation profile (TensorRT #1590), int pointers of live device or
mapped allocations with room for the shape, and plans tied to version + GPU (#2105 "Version tag does not
match"). Launches queue on the stream (devmem) and run when it is synchronised.
"""

from __future__ import annotations

import enum
import json
import struct
import weakref

import numpy as np

from . import devmem

__version__ = "10.3.0"
LOG: list[tuple[int, str]] = []
BUILDS = [0]  # engines built since import (a list so tests can reset it in place)
_MAGIC = b"FAKETRT1"


class Logger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = 0, 1, 2, 3, 4
    __slots__ = ("min_severity",)

    def __init__(self, min_severity: int = WARNING):
        self.min_severity = min_severity

    def log(self, severity: int, msg: str) -> None:
        LOG.append((severity, msg))


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0  # ignored in TensorRT 10
    STRONGLY_TYPED = 1


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0
    DLA_MANAGED_SRAM = 1
    DLA_LOCAL_DRAM = 2
    DLA_GLOBAL_DRAM = 3
    TACTIC_DRAM = 4


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8, DataType.INT32: np.int32,
       DataType.BOOL: np.bool_, DataType.UINT8: np.uint8, DataType.INT64: np.int64}
_ONNX_ELEM = {1: DataType.FLOAT, 10: DataType.HALF, 3: DataType.INT8, 6: DataType.INT32, 7: DataType.INT64}


def nptype(trt_type: DataType):
    return _NP[DataType(trt_type)]


class Dims(tuple):
    pass


class _Tensor:
    __slots__ = ("name", "shape", "dtype")

    def __init__(self, name: str, shape: tuple[int, ...], dtype: DataType):
        self.name, self.shape, self.dtype = name, Dims(shape), dtype


class INetworkDefinition:
    __slots__ = ("flags", "_inputs", "_outputs", "_onnx")

    def __init__(self, flags: int):
        self.flags, self._inputs, self._outputs, self._onnx = flags, [], [], None

    @property
    def num_inputs(self) -> int:
        return len(self._inputs)

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    def get_input(self, index: int) -> _Tensor:
        return self._inputs[index]

    def get_output(self, index: int) -> _Tensor:
        return self._outputs[index]

    def get_flag(self, flag: NetworkDefinitionCreationFlag) -> bool:
        return bool(self.flags & (1 << int(flag)))


class IParserError:
    __slots__ = ("_msg",)

    def __init__(self, msg: str):
        self._msg = msg

    def desc(self) -> str:
        return self._msg

    def __str__(self) -> str:
        return f"In node -1 (parse): {self._msg}"


class OnnxParser:
    __slots__ = ("network", "logger", "_errors")

    def __init__(self, network: INetworkDefinition, logger: Logger):
        if not isinstance(network, INetworkDefinition) or not isinstance(logger, Logger):
            raise TypeError("OnnxParser(network: INetworkDefinition, logger: ILogger)")
        self.network, self.logger, self._errors = network, logger, []

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int) -> IParserError:
        return self._errors[index]

    def parse(self, model: bytes, path: str | None = None) -> bool:
        import onnx

        if not isinstance(model, (bytes, bytearray, memoryview)):
            raise TypeError(f"parse() takes the serialized ONNX model as bytes, got {type(model).__name__}")
        try:
            proto = onnx.load_from_string(bytes(model))
            _toposort(proto.graph)  # onnx-tensorrt sorts the nodes itself; only cycles fail
            onnx.checker.check_model(proto)
        except Exception as exc:  # noqa: BLE001 - the real parser reports any failure as an error record
            self._errors.append(IParserError(f"failed to parse ONNX model: {exc}"))
            return False

        def tensors(values):
            return [_Tensor(v.name, tuple(d.dim_value if d.HasField("dim_value") else -1
                                          for d in v.type.tensor_type.shape.dim),
                            _ONNX_ELEM[v.type.tensor_type.elem_type]) for v in values]

        self.network._inputs = tensors(proto.graph.input)
        self.network._outputs = tensors(proto.graph.output)
        self.network._onnx = bytes(model)
        return True


def _toposort(graph) -> None:
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        done = [n for n in pending if all(i in ready for i in n.input)]
        if not done:
            raise ValueError("graph has a cycle or undefined inputs")
        ordered += done
        ready |= {o for n in done for o in n.output}
        done_ids = {id(n) for n in done}
        pending = [n for n in pending if id(n) not in done_ids]
    del graph.node[:]
    graph.node.extend(ordered)


class IOptimizationProfile:
    __slots__ = ("shapes",)

    def __init__(self) -> None:
        self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

    def set_shape(self, input: str, min, opt, max) -> None:  # noqa: A002 - the binding's keyword names
        dims = [tuple(int(d) for d in s) for s in (min, opt, max)]
        if not isinstance(input, str) or len({len(d) for d in dims}) != 1:
            raise TypeError("set_shape(input: str, min: Dims, opt: Dims, max: Dims) with equal ranks")
        if any(not a <= b <= c for a, b, c in zip(*dims, strict=True)):
            raise ValueError(f"set_shape({input}): need min <= opt <= max, got {dims}")
        self.shapes[input] = tuple(dims)


class IBuilderConfig:
    __slots__ = ("pools", "profiles")

    def __init__(self) -> None:
        self.pools: dict[MemoryPoolType, int] = {}
        self.profiles: list[IOptimizationProfile] = []

    def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
        if not isinstance(pool, MemoryPoolType) or not isinstance(pool_size, int):
            raise TypeError("set_memory_pool_limit(pool: MemoryPoolType, pool_size: int)")
        self.pools[pool] = pool_size

    def get_memory_pool_limit(self, pool: MemoryPoolType) -> int:
        return self.pools.get(pool, 1 << 40)

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.profiles)


class IHostMemory(bytes):
    @property
    def nbytes(self) -> int:
        return len(self)


class Builder:
    __slots__ = ("logger",)

    def __init__(self, logger: Logger):
        self.logger = logger

    @property
    def platform_has_fast_fp16(self) -> bool:
        return True

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        if not isinstance(flags, int):
            raise TypeError("create_network(flags: int)")
        return INetworkDefinition(flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> IHostMemory | None:
        if network._onnx is None:
            self.logger.log(Logger.ERROR, "network has no layers (was the ONNX parsed?)")
            return None
        for t in network._inputs:
            if -1 in t.shape:
                if not config.profiles:
                    self.logger.log(Logger.ERROR, "Network has dynamic or shape inputs, but no optimization "
                                    "profile has been defined.")
                    return None
                for p in config.profiles:
                    dims = p.shapes.get(t.name)
                    if dims is None or any(len(d) != len(t.shape) or any(s != -1 and s != v for s, v in
                                                                         zip(t.shape, d, strict=True)) for d in dims):
                        self.logger.log(Logger.ERROR, f"profile does not cover input {t.name} {t.shape}")
                        return None
        dev = devmem.STATE.device
        header = {"version": __version__, "gpu": dev.name, "sm": [dev.major, dev.minor],
                  "strongly_typed": network.get_flag(NetworkDefinitionCreationFlag.STRONGLY_TYPED),
                  "profiles": [p.shapes for p in config.profiles],
                  "io": [[t.name, list(t.shape), int(t.dtype), mode] for ts, mode in
                         ((network._inputs, 1), (network._outputs, 2)) for t in ts]}
        blob = json.dumps(header).encode()
        BUILDS[0] += 1
        return IHostMemory(_MAGIC + struct.pack("<I", len(blob)) + blob + network._onnx)


def _header(plan: bytes) -> tuple[dict, bytes]:
    if plan[:8] != _MAGIC:
        raise ValueError("not a plan")
    (n,) = struct.unpack("<I", plan[8:12])
    return json.loads(plan[12:12 + n]), plan[12 + n:]


class Runtime:
    __slots__ = ("logger",)

    def __init__(self, logger: Logger):
        self.logger = logger

    def deserialize_cuda_engine(self, serialized_engine) -> ICudaEngine | None:
        if not isinstance(serialized_engine, (bytes, bytearray, memoryview)):
            raise TypeError("deserialize_cuda_engine(serialized_engine: buffer)")
        try:
            header, onnx_bytes = _header(bytes(serialized_engine))
        except (ValueError, struct.error, json.JSONDecodeError):
            self.logger.log(Logger.ERROR, "1: [runtime.cpp::parsePlan] Error Code 1: Serialization failed")
            return None
        if header["version"] != __version__:
            self.logger.log(Logger.ERROR, "Serialization assertion plan->header.magicTag == rt::kPLAN_MAGIC_TAG "
                            "failed. Version tag does not match.")
            return None
        dev = devmem.STATE.device
        if header["gpu"] != dev.name or header["sm"] != [dev.major, dev.minor]:
            self.logger.log(Logger.ERROR, "The engine plan file is generated on an incompatible device")
            return None
        return ICudaEngine(header, onnx_bytes)


class ICudaEngine:
    __slots__ = ("header", "_io", "_onnx", "_session", "_contexts", "__weakref__")

    def __init__(self, header: dict, onnx_bytes: bytes):
        self.header, self._onnx, self._session = header, onnx_bytes, None
        self._io = {name: (tuple(shape), DataType(dt), TensorIOMode(mode)) for name, shape, dt, mode in header["io"]}
        self._contexts: weakref.WeakSet = weakref.WeakSet()

    @property
    def num_io_tensors(self) -> int:
        return len(self._io)

    @property
    def num_optimization_profiles(self) -> int:
        return max(len(self.header["profiles"]), 1)

    def get_tensor_name(self, index: int) -> str:
        return list(self._io)[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self._io[name][2]

    def get_tensor_dtype(self, name: str) -> DataType:
        return self._io[name][1]

    def get_tensor_shape(self, name: str) -> Dims:
        return Dims(self._io[name][0])

    def create_execution_context(self) -> IExecutionContext:
        ctx = IExecutionContext(self)
        self._contexts.add(ctx)
        return ctx

    def session(self):
        if self._session is None:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            self._session = ort.InferenceSession(self._onnx, so, providers=["CPUExecutionProvider"])
        return self._session


class IExecutionContext:
    __slots__ = ("engine", "profile", "claimed", "shapes", "addresses", "__weakref__")

    def __init__(self, engine: ICudaEngine):
        self.engine, self.profile, self.claimed, self.shapes, self.addresses = engine, 0, False, {}, {}

    def _dynamic(self) -> bool:
        return any(-1 in s for s, _, m in self.engine._io.values() if m == TensorIOMode.INPUT)

    def _claim(self, index: int) -> None:
        if self._dynamic():
            for other in self.engine._contexts:
                if other is not self and other.claimed and other.profile == index:
                    raise RuntimeError(f"Profile {index} has been chosen by another IExecutionContext. Use another "
                                       "profileIndex or destroy the IExecutionContext that uses this profile.")
        self.profile, self.claimed = index, True

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        if not isinstance(profile_index, int) or not isinstance(stream_handle, int):
            raise TypeError("set_optimization_profile_async(profile_index: int, stream_handle: int)")
        if not 0 <= profile_index < self.engine.num_optimization_profiles:
            return False
        self._claim(profile_index)
        return True

    def set_input_shape(self, name: str, shape) -> bool:
        static, _, mode = self.engine._io[name]
        shape = tuple(int(d) for d in shape)
        if mode != TensorIOMode.INPUT or len(shape) != len(static):
            return False
        profiles = self.engine.header["profiles"]
        if profiles:
            lo, _, hi = profiles[self.profile][name]
            if any(not a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
                LOG.append((Logger.ERROR, f"set_input_shape {name} {shape} outside profile {self.profile}"))
                return False
        self.shapes[name] = shape
        return True

    def get_tensor_shape(self, name: str) -> Dims:
        static, _, mode = self.engine._io[name]
        if mode == TensorIOMode.INPUT:
            return Dims(self.shapes.get(name, static))
        batch = next(iter(self.shapes.values()), (-1,))[0]
        return Dims((batch, *static[1:]))

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if not isinstance(name, str) or not isinstance(memory, int) or isinstance(memory, bool):
            raise TypeError(f"set_tensor_address(name: str, memory: int), got {type(memory).__name__}")
        if name not in self.engine._io:
            return False
        devmem.find(memory, 1, ("device", "mapped"))  # raises for host-only or dead pointers
        self.addresses[name] = memory
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        if not isinstance(stream_handle, int) or isinstance(stream_handle, bool):
            raise TypeError(f"execute_async_v3(stream_handle: int), got {type(stream_handle).__name__}")
        self._claim(self.profile)
        io = self.engine._io
        missing = [n for n in io if n not in self.addresses]
        unset = [n for n, (s, _, m) in io.items() if m == TensorIOMode.INPUT and -1 in s and n not in self.shapes]
        if missing or unset:
            LOG.append((Logger.ERROR, f"execute_async_v3: addresses missing for {missing}, shapes unset {unset}"))
            return False
        plan = {n: (self.addresses[n], tuple(self.get_tensor_shape(n)), nptype(io[n][1]), io[n][2]) for n in io}
        for addr, shape, dt, _ in plan.values():
            devmem.find(addr, int(np.prod(shape)) * np.dtype(dt).itemsize, ("device", "mapped"))

        def launch() -> None:
            feeds, outs = {}, []
            for n, (addr, shape, dt, mode) in plan.items():
                nbytes = int(np.prod(shape)) * np.dtype(dt).itemsize
                devmem.find(addr, nbytes, ("device", "mapped"))  # the buffers must outlive the launch
                if mode == TensorIOMode.INPUT:
                    feeds[n] = devmem.view(addr, nbytes).view(dt).reshape(shape).copy()
                else:
                    outs.append(n)
            results = self.engine.session().run(outs, feeds)
            for n, r in zip(outs, results, strict=True):
                addr, shape, dt, _ = plan[n]
                dst = devmem.view(addr, r.nbytes).view(dt).reshape(shape)
                dst[...] = r

        devmem.enqueue(stream_handle, launch)
        devmem.record("execute_async_v3")
        return True
