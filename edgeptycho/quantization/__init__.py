"""Deployment quantization: calibration data and observers, the dpu-pow2 / trt-int8 / fp16 schemes as ONNX,
the bit-exact DPU integer emulator, per-layer and held-out reports, and QAT (docs/quantization.md).

Submodules are imported where used (`from edgeptycho.quantization.schemes import quantize_model`): the
package itself pulls in nothing heavy, so `import edgeptycho` stays fast on any machine.
"""
