"""The CNN family (a residual encoder–decoder, pattern → amplitude and phase of a patch) and its YAML presets."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..config import ConfigError, from_mapping, load_yaml
from .preprocess import PreprocessSpec

PRESETS_DIR = Path(__file__).parent / "presets"
INPUT_NAME = "diffraction"
OUTPUT_NAMES = ("amplitude", "phase")


@dataclass
class NetworkConfig:
    """Architecture of one member of the family.

    stem conv (stride `stem_stride`, width widths[0]) → four encoder stages, each a stride-2 3×3 conv to
    widths[k] followed by `encoder_blocks` residual blocks → decoder of log2(stem_stride·16·M/N) up-stages
    mirroring the encoder widths (upsample ×2, then `decoder_blocks` residual blocks) → two 3×3-conv heads.
    The output is half the input (N → M = N/2) because the decoder has one fewer ×2 up-stage than the encoder
    has ×2 down-steps; no centre crop. No skip connections: the input lives in reciprocal space and the output
    in real space, so encoder features at a given resolution say nothing pixel-aligned about the output.

    bottleneck "dense": stage `dense_stage` (3 or 4) is a convolution whose kernel and stride equal the S×S
    map left by the stage before it (S = N / (stem_stride·2^(dense_stage−1))), i.e. a fully connected layer
    to widths[dense_stage] units at 1×1, and the decoder starts with a ConvTranspose of kernel S, stride 1,
    back to S×S×widths[dense_stage−1]; later widths are unused. Diffraction → object is
    a global map; a purely convolutional encoder–decoder trained on CPU budgets stayed on the
    predict-the-mean plateau while this one learned within ~1000 steps (docs/MODELS.md). Both are plain
    Conv/ConvTranspose (stride-1 deconvolution, kernel S ≤ 16 for the DPU).
    """

    input_size: int
    output_size: int
    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 128])  # stem, stage1..stage4
    stem_stride: int = 2
    encoder_blocks: int = 1
    decoder_blocks: int = 1
    upsample: Literal["convtranspose", "nearest-conv"] = "convtranspose"
    deconv_kernel: int = 2
    amplitude_head: Literal["softplus", "sigmoid"] = "softplus"
    amplitude_range: float = 1.0  # sigmoid head: amplitude = range · sigmoid(x)
    batchnorm: bool = False       # folded into the convolutions on export
    bottleneck: Literal["conv", "dense"] = "conv"
    dense_stage: int = 4

    def __post_init__(self) -> None:
        if len(self.widths) != 5 or any(w < 1 for w in self.widths):
            raise ValueError(f"widths must be 5 positive ints (stem + 4 stages), got {self.widths}")
        if self.stem_stride not in (1, 2, 4):
            raise ValueError(f"stem_stride must be 1, 2 or 4, got {self.stem_stride}")
        if self.deconv_kernel not in (2, 4):
            raise ValueError(f"deconv_kernel must be 2 or 4, got {self.deconv_kernel}")
        down = self.stem_stride * 16
        if self.input_size % down:
            raise ValueError(f"input_size {self.input_size} is not a multiple of stem_stride·16 = {down}")
        ratio = self.output_size * down / self.input_size
        if ratio < 1 or ratio != int(ratio) or int(ratio) & (int(ratio) - 1):
            raise ValueError(
                f"output_size {self.output_size} must be input_size/{down} times a power of two "
                f"(input_size {self.input_size})"
            )
        if self.encoder_blocks < 0 or self.decoder_blocks < 0:
            raise ValueError("encoder_blocks and decoder_blocks must be >= 0")
        if self.dense_stage not in (3, 4):
            raise ValueError(f"dense_stage must be 3 or 4, got {self.dense_stage}")
        if self.bottleneck == "dense" and self.output_size < self.dense_map:
            raise ValueError(f"dense bottleneck: output_size {self.output_size} < stage-3 map {self.dense_map}")

    @property
    def dense_map(self) -> int:
        """Side of the map entering the dense stage (its kernel and stride)."""
        return self.input_size // (self.stem_stride * 2 ** (self.dense_stage - 1))

    @property
    def n_up(self) -> int:
        """×2 up-stages of the decoder (after the dense bottleneck's ConvTranspose, when there is one)."""
        start = self.dense_map if self.bottleneck == "dense" else self.input_size // (self.stem_stride * 16)
        return int(round(math.log2(self.output_size / start)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainingConfig:
    """Default training recipe of a preset (command-line options override it)."""

    epochs: int = 30
    batch: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.0
    schedule: Literal["onecycle", "cosine"] = "onecycle"
    phase_weight: float = 1.0
    amplitude_weight: float = 1.0
    probe_weighting: bool = True  # weight the per-pixel loss by the probe intensity over the patch
    val_fraction: float = 0.05
    dataset_size: int = 50000     # pairs in the documented training set


@dataclass
class DataSpec:
    """Ranges of the simulated training physics (dataset.py draws every sample's parameters from them).

    Geometry: frames of the preset's frame_size at `pixel_m` object pixels (10 keV). Probes: zone plates
    (probability `zone_plate_fraction`) whose defocus is chosen to give a beam of `beam_px` across, or
    Gaussians of FWHM `gaussian_fwhm_px` with a curved wavefront; 1..max_modes incoherent modes.
    """

    pixel_m: float = 10e-9
    energy_eV: float = 10_000.0
    kinds: list[str] = field(default_factory=lambda: ["siemens-star", "ic", "cells", "texture"])
    dose: list[float] = field(default_factory=lambda: [1e4, 1e8])  # photons per pattern, log-uniform
    beam_px: list[float] = field(default_factory=lambda: [38.0, 60.0])  # zone-plate beam diameter (90 %)
    outer_zone_m: list[float] = field(default_factory=lambda: [20e-9, 45e-9])
    central_stop: list[float] = field(default_factory=lambda: [0.2, 0.45])
    zone_plate_fraction: float = 0.8
    gaussian_fwhm_px: list[float] = field(default_factory=lambda: [22.0, 35.0])
    max_modes: int = 3
    coherence_blur_px: list[float] = field(default_factory=lambda: [0.5, 1.5])
    phase_range: list[float] = field(default_factory=lambda: [0.5, 2.5])  # rad
    amplitude_min: list[float] = field(default_factory=lambda: [0.5, 1.0])
    object_windows: int = 3     # object side = object_windows × frame_size; patch centres drawn inside
    chunk: int = 256            # samples sharing one object and one probe
    # share of each chunk's positions drawn uniformly from a disc of `centre_radius_px` about the object's
    # centre, as a beamline scan of a test object is: uniform positions alone put ~1 % of the samples on a
    # Siemens star's finest (central) spokes, which a centred scan spends most of its positions on
    centre_fraction: float = 0.0
    centre_radius_px: float = 170.0

    def __post_init__(self) -> None:
        for name in ("dose", "beam_px", "outer_zone_m", "central_stop", "gaussian_fwhm_px",
                     "coherence_blur_px", "phase_range", "amplitude_min"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or lo_hi[0] > lo_hi[1]:
                raise ValueError(f"{name} must be a range [low, high], got {lo_hi}")
        if self.max_modes < 1 or self.chunk < 1 or self.object_windows < 2:
            raise ValueError("max_modes and chunk must be >= 1 and object_windows >= 2")
        if not 0.0 <= self.centre_fraction <= 1.0 or self.centre_radius_px <= 0:
            raise ValueError(f"centre_fraction must be in [0, 1] and centre_radius_px > 0, got "
                             f"{self.centre_fraction}, {self.centre_radius_px}")


@dataclass
class Preset:
    """A named model: architecture, the preprocessing that feeds it, and its training recipe."""

    name: str
    network: NetworkConfig
    preprocess: PreprocessSpec
    frame_size: int = 256
    description: str = ""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataSpec = field(default_factory=DataSpec)

    def __post_init__(self) -> None:
        size = self.preprocess.input_size(self.frame_size)
        if size != self.network.input_size:
            raise ValueError(
                f"preset '{self.name}': preprocess gives {size}×{size} from {self.frame_size}-px frames "
                f"but network.input_size is {self.network.input_size}"
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["preprocess"] = self.preprocess.to_dict()
        return d


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_preset(name_or_path: str | Path) -> Preset:
    """Preset by name (edgeptycho/model/presets/NAME.yaml) or path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix not in (".yaml", ".yml"):
        p = PRESETS_DIR / f"{name_or_path}.yaml"
        if not p.is_file():
            raise ConfigError(f"unknown model preset '{name_or_path}'; known: {', '.join(preset_names())}")
    return preset_from_dict(load_yaml(p))


def preset_from_dict(d: dict[str, Any]) -> Preset:
    return from_mapping(Preset, d)


def _conv_valid(cin: int, cout: int, k: int, bn: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride=k, bias=not bn)]
    return nn.Sequential(*layers, *([nn.BatchNorm2d(cout)] if bn else []))


def _conv(cin: int, cout: int, k: int, stride: int, bn: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride=stride, padding=(k - 1) // 2, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    """conv3×3 – ReLU – conv3×3, plus identity, then ReLU (Conv/Relu/Add only: DPU-expressible)."""

    def __init__(self, ch: int, bn: bool):
        super().__init__()
        self.conv1 = _conv(ch, ch, 3, 1, bn)
        self.conv2 = _conv(ch, ch, 3, 1, bn)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.conv2(self.act(self.conv1(x))))


def _up(cin: int, cout: int, cfg: NetworkConfig) -> nn.Module:
    if cfg.upsample == "convtranspose":
        k = cfg.deconv_kernel
        layers: list[nn.Module] = [nn.ConvTranspose2d(cin, cout, k, stride=2, padding=(k - 2) // 2,
                                                      bias=not cfg.batchnorm)]
        if cfg.batchnorm:
            layers.append(nn.BatchNorm2d(cout))
    else:
        # nearest ×2 + 3×3 conv: DPUCADF8H deconvolution supports stride 1 only, so this keeps the
        # decoder on the DPU (Resize-nearest folds into the next conv's input addressing).
        layers = [nn.Upsample(scale_factor=2, mode="nearest"), *_conv(cin, cout, 3, 1, cfg.batchnorm)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True))


class PtychoNet(nn.Module):
    """(B, 1, N, N) preprocessed pattern → amplitude (B, 1, M, M), phase (B, 1, M, M) in (−π, π)."""

    def __init__(self, cfg: NetworkConfig):
        super().__init__()
        self.cfg = cfg
        w, bn = cfg.widths, cfg.batchnorm
        enc: list[nn.Module] = [*_conv(1, w[0], 3 if cfg.stem_stride < 4 else 5, cfg.stem_stride, bn),
                                nn.ReLU(inplace=True)]
        dense = cfg.bottleneck == "dense"
        for k in range(1, 5):
            if dense and k == cfg.dense_stage:  # fully connected stage: kernel = stride = the whole S×S map
                enc += [*_conv_valid(w[k - 1], w[k], cfg.dense_map, bn), nn.ReLU(inplace=True)]
                break
            enc += [*_conv(w[k - 1], w[k], 3, 2, bn), nn.ReLU(inplace=True)]
            enc += [ResBlock(w[k], bn) for _ in range(cfg.encoder_blocks)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = []
        cin, top = w[4], 4
        if dense:  # 1×1 → S×S; stride 1 (a 1×1 input needs no stride), which the DPU supports
            ds = cfg.dense_stage
            dec += [nn.ConvTranspose2d(w[ds], w[ds - 1], cfg.dense_map, stride=1, bias=not bn)]
            dec += [nn.BatchNorm2d(w[ds - 1])] if bn else []
            dec += [nn.ReLU(inplace=True)]
            dec += [ResBlock(w[ds - 1], bn) for _ in range(cfg.decoder_blocks)]
            cin, top = w[ds - 1], ds - 1
        for j in range(1, cfg.n_up + 1):
            cout = w[max(top - j, 0)]
            dec.append(_up(cin, cout, cfg))
            dec += [ResBlock(cout, bn) for _ in range(cfg.decoder_blocks)]
            cin = cout
        self.decoder = nn.Sequential(*dec)
        self.amp_head = nn.Conv2d(cin, 1, 3, padding=1)
        self.phase_head = nn.Conv2d(cin, 1, 3, padding=1)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            if isinstance(m, ResBlock):
                # Start each block as identity (Fixup-style): without BatchNorm, deep stacks train stably.
                nn.init.zeros_(m.conv2[0].weight)
        nn.init.normal_(self.phase_head.weight, std=1e-2)
        nn.init.normal_(self.amp_head.weight, std=1e-2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.decoder(self.encoder(x))
        a = self.amp_head(f)
        if self.cfg.amplitude_head == "softplus":
            a = nn.functional.softplus(a)
        else:
            a = self.cfg.amplitude_range * torch.sigmoid(a)
        return a, math.pi * torch.tanh(self.phase_head(f))


def build_network(cfg: NetworkConfig) -> PtychoNet:
    return PtychoNet(cfg)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every (Conv|ConvTranspose, BatchNorm) pair into the convolution, in place; eval-mode semantics."""
    for mod in model.modules():
        if not isinstance(mod, nn.Sequential):
            continue
        names = list(mod._modules)
        for a, b in zip(names, names[1:], strict=False):
            conv, bnm = mod._modules[a], mod._modules[b]
            if not isinstance(bnm, nn.BatchNorm2d) or not isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)):
                continue
            scale = bnm.weight.detach() / torch.sqrt(bnm.running_var + bnm.eps)
            shift = bnm.bias.detach() - bnm.running_mean * scale
            with torch.no_grad():
                # Conv weight is (out, in, k, k); ConvTranspose weight is (in, out, k, k).
                shape = (-1, 1, 1, 1) if isinstance(conv, nn.Conv2d) else (1, -1, 1, 1)
                conv.weight.mul_(scale.reshape(shape))
                bias = conv.bias.detach() * scale if conv.bias is not None else torch.zeros_like(shift)
                conv.bias = nn.Parameter(bias + shift)
            mod._modules[b] = nn.Identity()
    return model


def count_parameters(model_or_cfg: nn.Module | NetworkConfig) -> int:
    model = build_network(model_or_cfg) if isinstance(model_or_cfg, NetworkConfig) else model_or_cfg
    return sum(p.numel() for p in model.parameters())


def flops(cfg: NetworkConfig) -> int:
    """FLOPs per pattern: 2 × multiply-accumulates of every Conv and ConvTranspose (activations not counted)."""
    model = build_network(cfg).eval()
    total = [0]

    def hook(m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        kh, kw = m.kernel_size
        if isinstance(m, nn.ConvTranspose2d):
            macs = inp[0].numel() * m.out_channels * kh * kw // m.groups
        else:
            macs = out.numel() * (m.in_channels // m.groups) * kh * kw
        total[0] += 2 * macs

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    with torch.no_grad():
        model(torch.zeros(1, 1, cfg.input_size, cfg.input_size))
    for h in handles:
        h.remove()
    return total[0]
