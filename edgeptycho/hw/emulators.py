"""Emulators that run anywhere with a target's numerics: jetson-emu (FP16 / trt-int8 QDQ) and alveo-emu (integer DPU)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from .base import TensorSpec, Ticket, cache_dir
from .cpu import CpuBackend

log = logging.getLogger(__name__)


def _input_size(model_path: Path) -> int:
    import onnx

    dims = onnx.load(str(model_path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return int(dims[-1].dim_value)


class _DerivingBackend(CpuBackend):
    """CPU backend whose session runs a model derived from the FP32 file on open (cached by sha256)."""

    scheme_for: dict[str, str | None] = {}
    multi_session = False

    def _prepare_model(self) -> Path:
        from ..quantization.qdq import derive_model, is_quantized, resolve_calibration

        scheme = self.scheme_for[self.precision]
        if is_quantized(self.model_path):
            if scheme in (None, "fp16"):
                raise ValueError(f"{self.model_path} is QDQ-quantised; open it with precision='int8'")
            log.info("%s: %s is already QDQ; running it as given", self.name, self.model_path)
            path = self.model_path
        elif scheme is None:
            path = self.model_path
        else:
            cal = None
            if scheme != "fp16":
                cal = resolve_calibration(self.options.get("calibration"), _input_size(self.model_path), self.name)
            path = derive_model(self.model_path, scheme, self.options.get("cache_dir") or cache_dir("qdq"), cal)
        # QDQ numerics as written: ORT's fusions (DQ→Conv→Q into QLinearConv) would change the arithmetic.
        self.default_optimization = "disable" if scheme not in (None, "fp16") else "basic"
        return path


class JetsonEmuBackend(_DerivingBackend):
    """Jetson numerics on any CPU: FP16 model (keep_io_types) or trt-int8 QDQ model through ONNX Runtime.

    FP16 rounds every tensor to half precision like a strongly typed TensorRT FP16 engine; int8 uses the
    explicit-quantization model a TensorRT 10 engine would be built from (symmetric, zero-point 0,
    per-channel weights). Options: ``calibration`` (preprocessed (n,1,N,N) array or .npy; synthetic, with a
    warning, when absent), ``cache_dir``, and the cpu backend's ``threads``.
    """

    name = "jetson-emu"
    precisions = ("fp32", "fp16", "int8")
    profile = "jetson-agx-orin"
    scheme_for = {"fp32": None, "fp16": "fp16", "int8": "trt-int8"}


class AlveoEmuBackend(_DerivingBackend):
    """Alveo DPU emulation: bit-exact integer DPU arithmetic in NumPy (DPU batch padded); numerics="ort-qdq" runs the pow2 QDQ model through ONNX Runtime instead.

    Input is int8 with the model input's fix_point (real = q·2**-fix_point), quantised half-up and saturated
    as the DPU does; float32 input is quantised the same way. The dpu-pow2 model (derived from an FP32 model,
    or a calibrated one from `edgeptycho calibrate`) runs through quantization.dpu_emulator: int8 tensors,
    integer accumulation, int8 bias shifted in, DPU_ROUND (half up) right shifts, saturation, fused ReLU;
    the heads stay float as on the card, where they run on the CPU. Options: ``numerics`` ("dpu", default, or
    "ort-qdq": ONNX Runtime QDQ arithmetic, half-to-even ties, for comparison), ``dpu_batch`` (default: the
    alveo-u250 profile's static batch), ``calibration``, ``cache_dir``, ``threads``.
    """

    name = "alveo-emu"
    precisions = ("int8",)
    profile = "alveo-u250"
    scheme_for = {"int8": "dpu-pow2"}

    def __init__(self, model_path: str | Path, batch_size: int, precision: str = "int8", **options: Any):
        super().__init__(model_path, batch_size, precision, **options)
        from ..quantization.qdq import input_fix_point
        from .registry import load_profile

        self.dpu_batch = int(options.get("dpu_batch") or load_profile(self.profile).batch.static or 1)
        if self.dpu_batch < 1:
            raise ValueError(f"dpu_batch must be >= 1, got {self.dpu_batch}")
        if self._static_batch is not None:
            raise ValueError(f"{self.model_path}: alveo-emu needs a dynamic-batch model to emulate DPU batching")
        fp_in = input_fix_point(self.run_path, self._input_spec.name)
        self.numerics = options.get("numerics", "dpu")
        if self.numerics not in ("dpu", "ort-qdq"):
            raise ValueError(f"numerics must be 'dpu' or 'ort-qdq', got {self.numerics!r}")
        self._dpu = None
        if self.numerics == "dpu":
            from ..quantization.dpu_emulator import DpuEmulator

            self._dpu = DpuEmulator.load(self.run_path)
        spec = self._input_spec
        self._input_spec = TensorSpec(spec.name, spec.shape, np.dtype(np.int8), spec.layout, 2.0**-fp_in, fp_in)
        jobs = -(-self.batch_size // self.dpu_batch)
        self._rows = jobs * self.dpu_batch  # the DPU always runs whole jobs; the tail of the last is padding
        self._xf = np.zeros((self._rows, *spec.shape[1:]), np.float32)
        self._pad_out = {s.name: np.zeros((self._rows, *s.shape[1:]), np.float32) for s in self._output_spec}

    def _run(self, x: np.ndarray, outputs: dict[str, np.ndarray], rows: int) -> None:
        if self._dpu is None:
            return super()._run(x, outputs, rows)
        self._dpu.run(x[:rows], outputs)  # x holds exact multiples of 2**-fp_in: requantising is lossless

    def submit(self, inputs: np.ndarray, outputs: dict[str, np.ndarray], n: int | None = None) -> Ticket:
        from ..quantization.qdq import dequantize_pow2, quantize_pow2

        spec = self._input_spec
        n = self.check_batch(inputs, outputs, n, (np.int8, np.float32))
        q = inputs[:n] if inputs.dtype == np.int8 else quantize_pow2(inputs[:n], spec.fix_point)
        dequantize_pow2(q, spec.fix_point, out=self._xf[:n])
        rows = -(-n // self.dpu_batch) * self.dpu_batch
        self._xf[n:rows] = 0.0
        direct = all(len(outputs[s.name]) >= rows for s in self._output_spec)
        target = outputs if direct else self._pad_out
        self._run(self._xf, target, rows)
        if not direct:
            for s in self._output_spec:
                outputs[s.name][:n] = self._pad_out[s.name][:n]
        ticket = Ticket(self._count, n, outputs, extra={"dpu_jobs": rows // self.dpu_batch})
        self._count += 1
        return ticket
