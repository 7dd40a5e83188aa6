"""Quantization-aware fine-tuning for dpu-pow2: DPU fake-quant (pow2 scales, straight-through estimator) on the
PyTorch network, for when post-training quantization loses too much accuracy.

The activation fix_points are the calibrated, constraint-refined ones of a dpu-pow2 PTQ pass and stay fixed;
weights and biases are fake-quantised every step at the non-overflow pow2 fix_point of their current values
(rounded half away from zero, as the DPU quantizer does), activations rounded half up and saturated. Gradients
pass straight through the rounding and stop outside the int8 range (clipped STE). The fine-tuned FP32 weights
are then quantised again with the same activation fix_points (schemes.quantize_model).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..model.network import PtychoNet, ResBlock


@dataclass
class QatSettings:
    steps: int = 400
    batch: int = 32
    lr: float = 1e-4
    threads: int = 2
    seed: int = 0


def fake_quant(x: torch.Tensor, fp: int, half_up: bool = True) -> torch.Tensor:
    """int8 at scale 2**-fp in the forward pass, identity gradient inside the range (clipped STE)."""
    s = 2.0 ** -fp
    y = torch.clamp(x, -128 * s, 127 * s)
    v = y / s
    q = torch.floor(v + 0.5) if half_up else torch.sign(v) * torch.floor(v.abs() + 0.5)
    return y + (q * s - y).detach()


def _param_fp(p: torch.Tensor) -> int:
    amax = float(p.detach().abs().max())
    return int(math.floor(math.log2(127.0 / max(amax, 2.0**-24))))


class QatNet(nn.Module):
    """A PtychoNet run with DPU fake-quant at every int8 tensor; `act_fps` in graph order (input first), as the
    dpu-pow2 scheme lists them (QuantResult.activations)."""

    def __init__(self, net: PtychoNet, act_fps: list[int]):
        super().__init__()
        if any(isinstance(m, nn.BatchNorm2d) for m in net.modules()):
            raise ValueError("QAT needs a BatchNorm-free network (fold BatchNorm first)")
        self.net, self.act_fps = net, list(act_fps)
        self.cfg = net.cfg
        self._k = 0

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        if self._k >= len(self.act_fps):
            raise ValueError(f"network has more int8 tensors than the {len(self.act_fps)} fix_points given")
        fp = self.act_fps[self._k]
        self._k += 1
        return fake_quant(x, fp)

    def _conv(self, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        w = fake_quant(m.weight, _param_fp(m.weight), half_up=False)
        b = None if m.bias is None else fake_quant(m.bias, _param_fp(m.bias), half_up=False)
        if isinstance(m, nn.ConvTranspose2d):
            return nn.functional.conv_transpose2d(x, w, b, m.stride, m.padding, m.output_padding, m.groups,
                                                  m.dilation)
        return nn.functional.conv2d(x, w, b, m.stride, m.padding, m.dilation, m.groups)

    def _seq(self, mods: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
        i = 0
        while i < len(mods):
            m = mods[i]
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                y = self._conv(m, x)
                if i + 1 < len(mods) and isinstance(mods[i + 1], nn.ReLU):
                    y = torch.relu(y)  # fused ReLU: one int8 tensor after it
                    i += 1
                x = self._act(y)
            elif isinstance(m, ResBlock):
                h = self._act(torch.relu(self._conv(m.conv1[0], x)))
                y = self._act(self._conv(m.conv2[0], h))
                x = self._act(torch.relu(x + y))
            elif isinstance(m, nn.Upsample):
                x = self._act(m(x))  # a resize keeps its input's fix_point (refine_dpu aligned them)
            elif isinstance(m, nn.Sequential):
                x = self._seq(list(m), x)
            else:
                raise ValueError(f"QAT has no integer rule for {type(m).__name__}")
            i += 1
        return x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._k = 0
        f = self._seq(list(self.net.decoder), self._seq(list(self.net.encoder), self._act(x)))
        a = self._act(self._conv(self.net.amp_head, f))
        p = self._act(self._conv(self.net.phase_head, f))
        if self._k != len(self.act_fps):
            raise ValueError(f"network has {self._k} int8 tensors, {len(self.act_fps)} fix_points given")
        if self.cfg.amplitude_head == "softplus":
            a = nn.functional.softplus(a)
        else:
            a = self.cfg.amplitude_range * torch.sigmoid(a)
        return a, math.pi * torch.tanh(p)


def qat_finetune(parent: Any, act_fps: list[int], data_dir: str | Path, settings: QatSettings,
                 log: Callable[[str], None] = print) -> tuple[PtychoNet, dict[str, Any]]:
    """Fine-tune the artifact's network with DPU fake-quant on a training set (edgeptycho dataset shards);
    returns the FP32 network and a summary (validation loss with fake-quant before and after)."""
    from ..model.dataset import read_manifest
    from ..model.export import model_from_onnx
    from ..model.network import preset_from_dict
    from ..model.train import PairData, evaluate, patch_loss, split_data

    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    preset = preset_from_dict(parent.metadata["architecture"])
    manifest = read_manifest(data_dir)
    if manifest.get("input_size") != preset.network.input_size or manifest.get("preprocess") != \
            preset.preprocess.to_dict():
        raise ValueError(f"dataset {data_dir} was made for a different input or preprocessing than model "
                         f"'{parent.name}'")
    arrays, train_rows, val_rows, _ = split_data(Path(data_dir), manifest, preset.training.val_fraction, None)
    w = preset.training.probe_weighting
    train_data, val_data = PairData(arrays, train_rows, w), PairData(arrays, val_rows[:2048], w)
    net = model_from_onnx(parent)
    qnet = QatNet(net, act_fps)
    before = evaluate(qnet, val_data, preset)
    opt = torch.optim.Adam(net.parameters(), lr=settings.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(settings.steps, 1))
    rng = np.random.default_rng(settings.seed)
    qnet.train()
    for step in range(settings.steps):
        x, amp_t, ph_t, wt = train_data.batch(rng.choice(len(train_data), settings.batch, replace=False))
        amp, ph = qnet(x)
        loss, _, _ = patch_loss(amp, ph, amp_t, ph_t, wt, preset.training.amplitude_weight,
                                preset.training.phase_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            log(f"QAT step {step + 1}/{settings.steps}: loss {loss.item():.4f}")
    after = evaluate(qnet, val_data, preset)
    log(f"QAT: fake-quant validation loss {before['loss']:.4f} → {after['loss']:.4f}")
    return net.eval(), {"steps": settings.steps, "batch": settings.batch, "lr": settings.lr,
                        "data": str(data_dir), "val_fake_quant_before": before, "val_fake_quant_after": after}
