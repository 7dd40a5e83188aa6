"""Jetson backend: TensorRT 10 strongly typed engines from ONNX (FP32/FP16/Q/DQ int8), cached, double-buffered streams.

TensorRT 10 Python API only (reference/deployment-toolchains.md): Builder → create_network(STRONGLY_TYPED) →
OnnxParser → builder config memory pool + one optimisation profile per execution context →
build_serialized_network → Runtime.deserialize_cuda_engine → name-based tensor I/O, set_input_shape,
set_tensor_address, execute_async_v3. No build_engine / max_workspace_size / execute_async_v2 /
get_binding_* / precision flags or calibrators.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .base import Allocator, Backend, BackendUnavailable, InFlight, TensorSpec, Ticket, cache_dir
from .cudart import device_count, open_binding
from .memory import CudaHostAllocator

log = logging.getLogger(__name__)

SLOTS = 2  # double buffering: batch k+1 is enqueued while batch k runs
FIX_TRT = ("install JetPack 6.1+ TensorRT 10.3 Python bindings (sudo apt install nvidia-jetpack, which brings "
           "python3-libnvinfer); on x86_64/SBSA servers use NVIDIA's tensorrt 10.x wheels")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_engine(trt: Any, onnx_path: Path, strongly_typed: bool, shapes: tuple[tuple[int, ...], ...],
                 workspace_bytes: int, profiles: int = SLOTS) -> bytes:
    """Serialized engine from ONNX; `shapes` = (min, opt, max) input shape; one profile per execution context."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    name = network.get_input(0).name
    for _ in range(profiles):
        # Contexts running concurrently on dynamic shapes need distinct profiles (TensorRT #1590).
        profile = builder.create_optimization_profile()
        profile.set_shape(name, *shapes)
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    return bytes(plan)


@dataclass
class _Slot:
    ctx: Any
    stream: Any
    in_host: np.ndarray                      # staging when the caller's input is not device-visible
    in_dev: int                              # what TensorRT reads for staged input
    out_host: dict[str, np.ndarray]
    out_dev: dict[str, int]
    device_allocs: list[Any] = field(default_factory=list)


class JetsonBackend(Backend):
    """TensorRT 10 on a Jetson (zero-copy mapped buffers) or a discrete GPU (pinned + device, async copies).

    Options: ``cuda_binding`` ("cuda-python" default if importable, or "pycuda"), ``device`` (0),
    ``cache_dir`` (engines; default $EDGEPTYCHO_CACHE/trt), ``workspace_mib`` (1024), ``calibration``
    (int8 from an FP32 model: preprocessed (n,1,N,N) array or .npy; synthetic with a warning when absent).
    """

    name = "jetson"
    precisions = ("fp32", "fp16", "int8")
    profile = "jetson-agx-orin"

    @classmethod
    def probe(cls) -> None:
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise BackendUnavailable(cls.name, f"tensorrt not importable ({exc})", FIX_TRT) from exc
        version = str(getattr(trt, "__version__", "0"))
        if int(version.split(".")[0]) < 10:
            raise BackendUnavailable(cls.name, f"TensorRT {version} is older than 10 (JetPack 6.0 ships 8.6)",
                                     "upgrade to JetPack 6.1+ (TensorRT 10.3, CUDA 12.6)")
        try:
            n, why = device_count()
        except ImportError as exc:
            raise BackendUnavailable(cls.name, f"no CUDA Python binding ({exc})",
                                     "pip install 'cuda-python>=12,<13' (or build pycuda on the device)") from exc
        if n == 0:
            raise BackendUnavailable(cls.name, f"no CUDA device ({why})",
                                     "run on the Jetson (or a CUDA GPU host) with the NVIDIA driver loaded; check "
                                     "/dev/nvhost-* or /dev/nvidia* and that the user is in the 'video' group")

    def __init__(self, model_path: str | Path, batch_size: int, precision: str = "fp32", **options: Any):
        super().__init__(model_path, batch_size, precision, **options)
        import tensorrt as trt

        self.trt = trt
        self.cuda = open_binding(options.get("cuda_binding"), int(options.get("device", 0)), self.name)
        self.zero_copy = self.cuda.info.integrated
        self._alloc = CudaHostAllocator(self.cuda, mapped=self.zero_copy)
        self._inflight = InFlight(SLOTS, self._finish)
        self._slots: list[_Slot] = []
        self.engine = self._runtime = None
        try:
            run_path = self._run_model()
            with self.cuda.active():
                self.engine = self._load_engine(run_path)
                self._setup_io()
                for i in range(SLOTS):
                    self._slots.append(self._make_slot(i))
        except BaseException:
            self.close()  # a half-opened backend must not leak pinned memory or a pycuda context
            raise

    # --- engine ---------------------------------------------------------------------------------------
    def _run_model(self) -> Path:
        from ..quantization.qdq import derive_model, is_quantized, resolve_calibration

        if not self.model_path.is_file():
            raise FileNotFoundError(f"model file not found: {self.model_path}")
        quantized = is_quantized(self.model_path)
        if quantized and self.precision != "int8":
            raise ValueError(f"{self.model_path} is QDQ-quantised: open it with precision='int8'")
        if self.precision == "fp32" or quantized:
            return self.model_path
        qdq_cache = self.options.get("cache_dir") or cache_dir("qdq")
        if self.precision == "fp16":
            return derive_model(self.model_path, "fp16", qdq_cache)
        import onnx

        size = onnx.load(str(self.model_path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
        cal = resolve_calibration(self.options.get("calibration"), int(size[-1].dim_value), self.name)
        return derive_model(self.model_path, "trt-int8", qdq_cache, cal)

    def _engine_key(self, run_path: Path) -> dict[str, Any]:
        info = self.cuda.info
        return {"tensorrt": str(self.trt.__version__), "gpu": info.name, "compute_capability": info.compute_capability,
                "model_sha256": _sha256(run_path), "precision": self.precision, "max_batch": self.batch_size,
                "profiles": SLOTS}

    def _load_engine(self, run_path: Path) -> Any:
        import onnx

        key = self._engine_key(run_path)
        root = Path(self.options.get("cache_dir") or cache_dir("trt"))
        root.mkdir(parents=True, exist_ok=True)
        plan_path = root / f"{run_path.stem}-{key['model_sha256'][:12]}-{self.precision}-b{self.batch_size}.plan"
        key_path = plan_path.with_suffix(".json")
        # Kept for the engine's lifetime: the runtime (and its logger) must outlive what it deserialised.
        self._runtime = runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
        if plan_path.is_file() and key_path.is_file():
            stored = json.loads(key_path.read_text())
            if stored == key:
                engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
                if engine is not None:
                    log.info("%s: loaded cached engine %s", self.name, plan_path)
                    self.engine_path = plan_path
                    return engine
                log.warning("%s: cached engine %s failed to deserialize; rebuilding", self.name, plan_path)
            else:
                changed = sorted(k for k in key if stored.get(k) != key[k])
                log.warning("%s: engine %s was built for a different %s; rebuilding", self.name, plan_path,
                            ", ".join(changed))
        dims = [d.dim_value for d in onnx.load(str(run_path), load_external_data=False)
                .graph.input[0].type.tensor_type.shape.dim]
        if any(d <= 0 for d in dims[1:]):
            raise ValueError(f"{run_path}: input needs fixed non-batch dims, got {dims}")
        frame = tuple(dims[1:])
        shapes = ((1, *frame), (self.batch_size, *frame), (self.batch_size, *frame))
        blob = build_engine(self.trt, run_path, self.precision != "fp32", shapes,
                            int(self.options.get("workspace_mib", 1024)) << 20)
        tmp = plan_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(blob)
        os.replace(tmp, plan_path)
        key_path.write_text(json.dumps(key, indent=2, sort_keys=True) + "\n")
        log.info("%s: built engine %s", self.name, plan_path)
        self.engine_path = plan_path
        engine = runtime.deserialize_cuda_engine(blob)
        if engine is None:
            raise RuntimeError(f"TensorRT could not deserialize the engine it just built ({plan_path})")
        return engine

    def _setup_io(self) -> None:
        trt, engine = self.trt, self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1:
            raise ValueError(f"{self.name}: engine has inputs {inputs}, expected one")
        specs = []
        for n in [*inputs, *outputs]:
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(n)))
            shape = tuple(engine.get_tensor_shape(n))  # batch is -1 (dynamic); the rest must be fixed
            if dtype != np.float32 or any(d < 1 for d in shape[1:]):
                raise ValueError(f"{self.name}: tensor '{n}' is {dtype} {shape}; expected float32 with a "
                                 "dynamic batch and fixed frame dims")
            specs.append(TensorSpec(n, (self.batch_size, *shape[1:]), dtype))
        self._input_spec, self._output_spec = specs[0], tuple(specs[1:])

    def _make_slot(self, i: int) -> _Slot:
        ctx = self.engine.create_execution_context()
        stream = self.cuda.stream()
        ctx.set_optimization_profile_async(i, self.cuda.stream_handle(stream))
        in_host = self._alloc.empty(self._input_spec.shape, np.float32)
        out_host = {s.name: self._alloc.empty(s.shape, np.float32) for s in self._output_spec}
        slot = _Slot(ctx, stream, in_host, 0, out_host, {})
        if self.zero_copy:  # the GPU reads/writes the mapped staging pages directly
            slot.in_dev = self._alloc.device_pointer(in_host)
            slot.out_dev = {k: self._alloc.device_pointer(v) for k, v in out_host.items()}
        else:
            for spec in (self._input_spec, *self._output_spec):
                ptr, handle = self.cuda.device_alloc(spec.nbytes)
                slot.device_allocs.append(handle)
                if spec is self._input_spec:
                    slot.in_dev = ptr
                else:
                    slot.out_dev[spec.name] = ptr
        return slot

    # --- the contract --------------------------------------------------------------------------------
    def allocator(self) -> Allocator:
        """Mapped pinned memory on Jetson (the engine reads ring slots in place), pinned memory on a dGPU."""
        return self._alloc

    def submit(self, inputs: np.ndarray, outputs: dict[str, np.ndarray], n: int | None = None) -> Ticket:
        n = self.check_batch(inputs, outputs, n)
        spec = self._input_spec
        index = self._inflight.next_slot()
        slot = self._slots[index]
        copy_back = []
        with self.cuda.active():
            handle = self.cuda.stream_handle(slot.stream)
            src = inputs[:n]
            if self.zero_copy:
                in_ptr = self._alloc.device_pointer(src)
                if in_ptr is None:  # not a mapped ring slot: one host copy into the mapped staging pages
                    np.copyto(slot.in_host[:n], src)
                    in_ptr = slot.in_dev
            else:
                if not self._alloc.owns(src):  # async H2D needs page-locked memory
                    np.copyto(slot.in_host[:n], src)
                    src = slot.in_host[:n]
                self.cuda.htod_async(slot.in_dev, src, slot.stream)
                in_ptr = slot.in_dev
            slot.ctx.set_input_shape(spec.name, (n, *spec.shape[1:]))
            slot.ctx.set_tensor_address(spec.name, int(in_ptr))
            landing = []  # (output, host array the result lands in before wait() returns)
            for s in self._output_spec:
                dst = outputs[s.name][:n]
                if self.zero_copy:
                    ptr = self._alloc.device_pointer(dst)  # a mapped caller buffer: the engine writes it directly
                    staged = ptr is None
                    ptr = slot.out_dev[s.name] if staged else ptr
                else:
                    ptr, staged = slot.out_dev[s.name], not self._alloc.owns(dst)
                slot.ctx.set_tensor_address(s.name, int(ptr))
                host = slot.out_host[s.name][:n] if staged else dst
                landing.append((s.name, host))
                if staged:
                    copy_back.append((dst, host))
            if not slot.ctx.execute_async_v3(handle):
                raise RuntimeError(f"{self.name}: execute_async_v3 failed to enqueue (see the TensorRT log)")
            if not self.zero_copy:  # D2H after the launch on the same stream, so ordered behind it
                for name, host in landing:
                    self.cuda.dtoh_async(host, slot.out_dev[name], slot.stream)
        return self._inflight.issue(index, n, outputs, handle=slot, copy_back=copy_back)

    def _finish(self, ticket: Ticket) -> None:
        self.cuda.synchronize(ticket.handle.stream)
        for dst, src in ticket.extra["copy_back"]:
            np.copyto(dst, src)

    def wait(self, ticket: Ticket) -> dict[str, np.ndarray]:
        return self._inflight.complete(ticket)

    def telemetry(self) -> dict[str, Any]:
        from .power import jetson_telemetry, nvidia_telemetry

        return jetson_telemetry() if self.cuda.info.integrated else nvidia_telemetry(self.cuda.info.index)

    def close(self) -> None:
        if self.cuda is None:
            return
        with self.cuda.active():  # TensorRT objects free device memory as they go: keep the context current
            if self._slots:
                self._inflight.drain()
            for slot in self._slots:
                self.cuda.synchronize(slot.stream)
                for handle in slot.device_allocs:
                    self.cuda.device_free(handle)
                self.cuda.stream_destroy(slot.stream)
            self._slots = []
            self.engine = self._runtime = None
            self._alloc.close()
        self.cuda.close()
        self.cuda = None
