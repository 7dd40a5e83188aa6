"""The one preprocessing of diffraction patterns into CNN input, shared by training, tools and the serve loop."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..physics.forward import bin_frames, crop_center


@dataclass(frozen=True)
class PreprocessSpec:
    """How a detector frame becomes model input; stored in every model's metadata.

    frame (H, W) → centre crop to `crop` (0 = no crop) → `bin`×`bin` sum binning → log1p → divided by the
    frame's mean log value (dose invariance) → written into the model input (float, or int8 with a scale).
    Binning keeps the object pixel size (λz / (N·dx) with N/b and b·dx); cropping multiplies it by H/crop.
    """

    crop: int = 0
    bin: int = 1
    log: bool = True
    normalize: str = "frame-mean"  # "frame-mean" | "none"

    def __post_init__(self) -> None:
        if self.bin < 1:
            raise ValueError(f"bin must be >= 1, got {self.bin}")
        if self.crop < 0:
            raise ValueError(f"crop must be >= 0, got {self.crop}")
        if self.crop and self.crop % self.bin:
            raise ValueError(f"crop {self.crop} is not a multiple of bin {self.bin}")
        if self.normalize not in ("frame-mean", "none"):
            raise ValueError(f"normalize must be 'frame-mean' or 'none', got {self.normalize!r}")

    def input_size(self, frame_size: int) -> int:
        size = self.crop or frame_size
        if size > frame_size:
            raise ValueError(f"crop {size} larger than the detector frame {frame_size}")
        if size % self.bin:
            raise ValueError(f"frame size {size} is not a multiple of bin {self.bin}")
        return size // self.bin

    def pixel_size_factor(self, frame_size: int) -> float:
        """Model object pixel size ÷ the full-frame object pixel size."""
        return frame_size / (self.crop or frame_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessSpec:
        return cls(**d)


def _crop_bin(frames: np.ndarray, spec: PreprocessSpec, out: np.ndarray | None = None) -> np.ndarray:
    if spec.crop:
        frames = crop_center(frames, spec.crop)
    return bin_frames(frames, spec.bin, dtype=np.float32, out=out)


def preprocess_into(
    frames: np.ndarray,
    out: np.ndarray,
    spec: PreprocessSpec,
    mask: np.ndarray | None = None,
    scale: float = 1.0,
) -> np.ndarray:
    """Preprocess `frames` (n, H, W) or (H, W) into `out` (n, 1, N, N) or (n, N, N) in place.

    `mask` (H, W), nonzero = bad pixel, is zeroed before binning. `out` may be float32/float16, or int8 with
    `scale` (real = stored × scale, the DPU fix_point convention). Returns `out`.
    """
    frames = np.asarray(frames)
    if frames.ndim == 2:
        frames = frames[None]
    if mask is not None:
        frames = np.where(mask, 0, frames)
    n = frames.shape[0]
    side = spec.input_size(frames.shape[-1])
    target = out.reshape(out.shape[0], side, side)[:n]
    direct = target.dtype == np.float32 and scale == 1.0 and not np.may_share_memory(target, frames)
    # direct: the one write of the (binned) frames, straight into the model input; the rest is in place
    x = _crop_bin(frames, spec, out=target if direct else None)
    # log1p/normalise run in place: never on the caller's frames (a crop or bin-1 result may be a view).
    if not direct and (np.may_share_memory(x, frames) or not x.flags.writeable or x.dtype != np.float32):
        x = x.astype(np.float32)
    if spec.log:
        if not np.issubdtype(frames.dtype, np.unsignedinteger):  # counts cannot be negative: skip a pass
            np.maximum(x, 0, out=x)
        np.log1p(x, out=x)
    if spec.normalize == "frame-mean":
        m = x.reshape(n, -1).mean(axis=1)
        m[m <= 0] = 1.0
        x /= m[:, None, None]
    if direct:
        pass
    elif target.dtype == np.int8:
        np.multiply(x, 1.0 / scale, out=x)
        np.floor(x + 0.5, out=x)  # DPU rounds activations half up
        np.clip(x, -128, 127, out=x)
        target[...] = x
    else:
        target[...] = x if scale == 1.0 else x / scale
    return out


def preprocess(frames: np.ndarray, spec: PreprocessSpec, mask: np.ndarray | None = None) -> np.ndarray:
    """Allocate and return float32 model input (n, 1, N, N)."""
    frames = np.asarray(frames)
    if frames.ndim == 2:
        frames = frames[None]
    size = spec.input_size(frames.shape[-1])
    out = np.empty((frames.shape[0], 1, size, size), np.float32)
    return preprocess_into(frames, out, spec, mask)
