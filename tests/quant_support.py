"""Helpers for the quantization tests: small ONNX models that exercise every integer layer type."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np


def export(net, path: Path, size: int) -> Path:
    """Export `net` (input 'diffraction' (B, 1, size, size); outputs amplitude, phase) with a dynamic batch."""
    import torch

    dyn = {n: {0: "batch"} for n in ("diffraction", "amplitude", "phase")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(net.eval(), (torch.zeros(2, 1, size, size),), str(path), input_names=["diffraction"],
                          output_names=["amplitude", "phase"], dynamic_axes=dyn, opset_version=17, dynamo=False)
    return path


def concat_model(path: Path, size: int = 32, seed: int = 0) -> Path:
    """Strided conv → two branches (conv+ReLU, conv) → concat → residual block → ConvTranspose k4 s2 →
    nearest ×2 + conv → heads: every layer type the DPU emulator implements, with random (seeded) weights."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(1, 6, 3, 2, 1)
            self.a = nn.Conv2d(6, 5, 3, 1, 1)
            self.b = nn.Conv2d(6, 3, 1, 1, 0)
            self.r1 = nn.Conv2d(8, 8, 3, 1, 1)
            self.r2 = nn.Conv2d(8, 8, 3, 1, 1)
            self.up = nn.ConvTranspose2d(8, 6, 4, 2, 1)
            self.near = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(6, 4, 3, 1, 1))
            self.amp = nn.Conv2d(4, 1, 3, 1, 1)
            self.phase = nn.Conv2d(4, 1, 3, 1, 1)

        def forward(self, x):
            h = torch.relu(self.stem(x))
            h = torch.cat([torch.relu(self.a(h)), self.b(h)], dim=1)
            h = torch.relu(h + self.r2(torch.relu(self.r1(h))))
            h = torch.relu(self.near(torch.relu(self.up(h))))
            return nn.functional.softplus(self.amp(h)), math.pi * torch.tanh(self.phase(h))

    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.5)  # biases and weights large enough that every bias matters after rounding
    return export(net, path, size)


def patterns(n: int, size: int, seed: int = 0) -> np.ndarray:
    from edgeptycho.quantization.qdq import synthetic_patterns

    return synthetic_patterns(n, size, seed=seed)
