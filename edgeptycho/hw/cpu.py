"""CPU backend: ONNX Runtime with IOBinding straight into preallocated output arrays (FP32 or QDQ int8 models)."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .base import Backend, BackendUnavailable, InFlight, TensorSpec, Ticket

log = logging.getLogger(__name__)

OPT_LEVELS = ("disable", "basic", "extended", "all")


def physical_cores() -> int:
    """Physical cores this process may run on (hyperthread siblings counted once)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in allowed:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{base}/physical_package_id") as f:
                pkg = f.read().strip()
            with open(f"{base}/core_id") as f:
                cores.add((pkg, f.read().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(len(cores), 1)


def _dims(value_info) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value_info.type.tensor_type.shape.dim]


class CpuBackend(Backend):
    """ONNX Runtime on the host CPU: the embedded default, and the FP32 reference every backend is checked against.

    Options: ``threads`` (cores the backend uses, default physical cores), ``workers`` (sessions running
    batches concurrently, each on its own thread with threads/workers intra-op threads; default 2 where
    threads >= 2), ``spinning`` (idle threads busy-wait; default False), ``graph_optimization`` ("disable" |
    "basic" | "extended" | "all", default "all"). Precision ``int8`` means the model file is already QDQ-quantised.

    With one worker, submit() computes synchronously. With several, submit() hands the batch to the next
    session's thread and returns; wait() blocks for it. Two one-thread sessions on 2 cores beat one two-thread
    session by 7-28 % (no parallel-for barriers), and a helper thread that takes a core for a moment delays
    one batch instead of stalling both threads of every operator (docs/BENCHMARKS.md, "Streaming pipeline", session 4).
    """

    name = "cpu"
    precisions = ("fp32", "int8")
    profile = "cpu"
    default_optimization = "all"
    multi_session = True  # emulators keep one session: their submit() stages data in shared buffers

    @classmethod
    def probe(cls) -> None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise BackendUnavailable(cls.name, f"onnxruntime not importable ({exc})",
                                     "pip install 'onnxruntime>=1.17'") from exc

    def __init__(self, model_path: str | Path, batch_size: int, precision: str = "fp32", **options: Any):
        super().__init__(model_path, batch_size, precision, **options)
        import onnxruntime as ort

        if not self.model_path.is_file():
            raise FileNotFoundError(f"model file not found: {self.model_path}")
        self.run_path = self._prepare_model()
        self.threads = int(options.get("threads") or physical_cores())
        default_workers = 2 if self.multi_session and self.threads >= 2 else 1
        self.workers = int(options.get("workers") or default_workers)
        if not 1 <= self.workers <= self.threads:
            raise ValueError(f"{self.name}: workers must be between 1 and threads ({self.threads}), got {self.workers}")
        if self.workers > 1 and not self.multi_session:
            raise ValueError(f"{self.name}: workers > 1 is not supported (one session emulates the device)")
        # threads split over the sessions: 3 threads, 2 workers -> 2 + 1
        split = [self.threads // self.workers + (i < self.threads % self.workers) for i in range(self.workers)]
        self.sessions = [self._session(ort, t, options) for t in split]
        self.session = self.sessions[0]
        self._ios = [s.io_binding() for s in self.sessions]
        self._input_spec, self._output_spec, self._static_batch = self._specs()
        self._count = 0
        self._pools: list[ThreadPoolExecutor] = []
        self._inflight: InFlight | None = None
        if self.workers > 1:  # one thread per session, so each session only ever runs one batch at a time
            self._pools = [ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-session{i}")
                           for i in range(self.workers)]
            self._inflight = InFlight(self.workers, lambda ticket: ticket.handle.result())
        self.wait_from_other_thread = self._inflight is not None  # futures: waitable from any thread

    def _session(self, ort: Any, threads: int, options: dict[str, Any]) -> Any:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Idle intra-op threads spin by default, burning the cores the serve loop's other threads (and other
        # processes) need: on the shared 2-core VM, spinning off measured 1.5-2x the bare throughput (median
        # of 6 interleaved runs: cpu-default 119 → 176, tiny 2023 → 4045 patterns/s). spinning=True restores it.
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.get("spinning") else "0")
        level = options.get("graph_optimization", self.default_optimization)
        if level not in OPT_LEVELS:
            raise ValueError(f"graph_optimization must be one of {OPT_LEVELS}, got {level!r}")
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[level]
        return ort.InferenceSession(str(self.run_path), so, providers=["CPUExecutionProvider"])

    # --- model -----------------------------------------------------------------------------------------
    def _prepare_model(self) -> Path:
        """The ONNX file the session runs; emulators override this to derive FP16/QDQ models."""
        from ..quantization.qdq import is_quantized

        quantized = is_quantized(self.model_path)
        if quantized and self.precision != "int8":
            raise ValueError(f"{self.model_path} is QDQ-quantised: open it with precision='int8'")
        if not quantized and self.precision == "int8":
            raise ValueError(f"{self.model_path} has no Q/DQ nodes: precision 'int8' on the cpu backend runs a "
                             "QDQ model as given; use jetson-emu or alveo-emu to derive one from an FP32 model")
        return self.model_path

    def _specs(self) -> tuple[TensorSpec, tuple[TensorSpec, ...], int | None]:
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"{self.run_path}: expected one input, found {[i.name for i in inputs]}")
        inp = inputs[0]
        if inp.type != "tensor(float)":
            raise ValueError(f"{self.run_path}: input '{inp.name}' is {inp.type}, expected tensor(float)")
        shape = list(inp.shape)
        if any(not isinstance(d, int) for d in shape[1:]):
            raise ValueError(f"{self.run_path}: input '{inp.name}' needs fixed non-batch dims, got {shape}")
        static = shape[0] if isinstance(shape[0], int) else None
        if static is not None and static < self.batch_size:
            raise ValueError(f"{self.run_path}: fixed batch {static} < batch_size {self.batch_size}")
        batch = static or self.batch_size
        in_spec = TensorSpec(inp.name, (batch, *shape[1:]), np.dtype(np.float32))
        outs = self.session.get_outputs()
        if any(not all(isinstance(d, int) for d in o.shape[1:]) for o in outs):
            # Symbolic non-batch output dims: learn them from one zero batch.
            probe = self.session.run(None, {inp.name: np.zeros((1, *shape[1:]), np.float32)})
            out_shapes = [tuple(p.shape[1:]) for p in probe]
        else:
            out_shapes = [tuple(o.shape[1:]) for o in outs]
        out_specs = tuple(TensorSpec(o.name, (batch, *s), np.dtype(np.float32))
                          for o, s in zip(outs, out_shapes, strict=True))
        return in_spec, out_specs, static

    # --- running ---------------------------------------------------------------------------------------
    def _run(self, x: np.ndarray, outputs: dict[str, np.ndarray], rows: int, worker: int = 0) -> None:
        """Run the first `rows` frames of float32 `x` straight into `outputs` (pointer binding, no copies)."""
        io = self._ios[worker]
        spec = self._input_spec
        io.bind_input(spec.name, "cpu", 0, np.float32, [rows, *spec.shape[1:]], x.ctypes.data)
        for s in self._output_spec:
            io.bind_output(s.name, "cpu", 0, np.float32, [rows, *s.shape[1:]], outputs[s.name].ctypes.data)
        self.sessions[worker].run_with_iobinding(io)

    def submit(self, inputs: np.ndarray, outputs: dict[str, np.ndarray], n: int | None = None) -> Ticket:
        n = self.check_batch(inputs, outputs, n)
        # A dynamic-batch model runs on the first n frames only; a fixed-batch one runs whole (padding ignored).
        rows = self._static_batch or n
        if rows > len(inputs) or any(len(outputs[s.name]) < rows for s in self._output_spec):
            raise ValueError(f"{self.name}: fixed-batch model needs full {rows}-frame input and output buffers")
        if self._inflight is None:  # one session: ONNX Runtime computes here
            self._run(inputs, outputs, rows)
            ticket = Ticket(self._count, n, outputs)
            self._count += 1
            return ticket
        worker = self._inflight.next_slot()  # round robin; waits first if that session is still busy
        job = self._pools[worker].submit(self._run, inputs, outputs, rows, worker)
        return self._inflight.issue(worker, n, outputs, handle=job)

    def wait(self, ticket: Ticket) -> dict[str, np.ndarray]:
        if self._inflight is None:
            return ticket.outputs  # ONNX Runtime ran synchronously in submit()
        return self._inflight.complete(ticket)  # re-raises a failed run's exception here

    def telemetry(self) -> dict[str, Any]:
        from .power import cpu_telemetry

        return cpu_telemetry()

    def close(self) -> None:
        if self._inflight is not None:
            for ticket in self._inflight.pending:  # let running batches finish; their errors do not matter now
                if ticket is not None:
                    ticket.handle.exception()
        for pool in self._pools:
            pool.shutdown(wait=True)
        self._pools, self._inflight = [], None
        self._ios, self.sessions, self.session = [], [], None

