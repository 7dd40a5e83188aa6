"""Shared test fixtures."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest


@dataclass(frozen=True)
class TinyModel:
    """A tiny CNN with the model interface (diffraction → amplitude, phase), exported with a dynamic batch.

    `path`: the full model (softplus / π·tanh heads); `body`: the same weights without heads, outputs
    'amplitude_logits' / 'phase_logits' (what a DPU runs; the fake xmodel uses it).
    """

    path: Path
    body: Path
    input_size: int
    output_size: int


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> TinyModel:
    """32×32 in → 16×16 out: strided-conv encoder, ConvTranspose decoder, random weights (seeded)."""
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self, heads: bool):
            super().__init__()
            self.heads = heads
            self.enc = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
            self.dec_amp = nn.Sequential(nn.ConvTranspose2d(16, 8, 4, 2, 1), nn.ReLU(), nn.Conv2d(8, 1, 3, 1, 1))
            self.dec_phase = nn.Sequential(nn.ConvTranspose2d(16, 8, 4, 2, 1), nn.ReLU(),
                                           nn.Conv2d(8, 1, 3, 1, 1))

        def forward(self, x):
            h = self.enc(x)
            a, p = self.dec_amp(h), self.dec_phase(h)
            if self.heads:
                return nn.functional.softplus(a), math.pi * torch.tanh(p)
            return a, p

    torch.manual_seed(0)
    model = Tiny(heads=True).eval()
    body = Tiny(heads=False).eval()
    body.load_state_dict(model.state_dict())
    out = tmp_path_factory.mktemp("tiny_model")
    paths = {}
    for key, net, names in (("path", model, ["amplitude", "phase"]),
                            ("body", body, ["amplitude_logits", "phase_logits"])):
        paths[key] = out / f"tiny_{key}.onnx"
        dyn = {n: {0: "batch"} for n in ["diffraction", *names]}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(net, (torch.zeros(2, 1, 32, 32),), str(paths[key]), input_names=["diffraction"],
                              output_names=names, dynamic_axes=dyn, opset_version=17, dynamo=False)
    return TinyModel(paths["path"], paths["body"], 32, 16)


@pytest.fixture(scope="session")
def tiny_inputs(tiny_onnx) -> np.ndarray:
    """Ten preprocessed diffraction-like patterns (float32 (10, 1, 32, 32)), not the calibration set."""
    from edgeptycho.quantization.qdq import synthetic_patterns

    return synthetic_patterns(10, tiny_onnx.input_size, seed=123)


@pytest.fixture(scope="session")
def tiny_reference(tiny_onnx, tiny_inputs) -> dict[str, np.ndarray]:
    """CPU FP32 outputs of the tiny model on `tiny_inputs`: the reference every backend is compared with."""
    from edgeptycho.hw import open_backend

    with open_backend("cpu", tiny_onnx.path, 4) as b:
        return b.infer(tiny_inputs)


@pytest.fixture(scope="session")
def tiny_calibration(tiny_onnx) -> np.ndarray:
    """32 preprocessed synthetic patterns for int8 calibration (a different seed from `tiny_inputs`)."""
    from edgeptycho.quantization.qdq import synthetic_patterns

    return synthetic_patterns(32, tiny_onnx.input_size, seed=7)


@pytest.fixture
def hw_cache(tmp_path, monkeypatch) -> Path:
    """A private EDGEPTYCHO_CACHE so derived models and engines never touch ~/.cache."""
    monkeypatch.setenv("EDGEPTYCHO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
