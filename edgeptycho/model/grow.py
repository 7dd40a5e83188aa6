"""Warm starts across widths: copy a trained network into a wider member of the family without changing its output.

Net2WiderNet (Chen et al., ICLR 2016) in its simplest exact form. Every weight tensor of the wider network gets
the trained tensor in its leading block; the connections *from* the new channels or units *into* the old
ones are zero, so the old channels compute exactly what they did, and the heads (which read only old
channels) give the same amplitude and phase. The new channels keep their fresh (Kaiming) incoming weights:
they carry activations from the first step, so their zero outgoing weights receive gradients and learn.
Only widths may grow; depth, kernel sizes, strides and input/output sizes must match.
"""

from __future__ import annotations

import torch
from torch import nn

from .network import NetworkConfig, PtychoNet, build_network


def _same_shape_family(narrow: NetworkConfig, wide: NetworkConfig) -> None:
    a, b = narrow.to_dict(), wide.to_dict()
    fixed = {k: (a[k], b[k]) for k in a if k != "widths" and a[k] != b[k]}
    if fixed:
        raise ValueError(f"only widths may differ when widening; these differ: {fixed}")
    if any(w1 > w2 for w1, w2 in zip(narrow.widths, wide.widths, strict=True)):
        raise ValueError(f"widths may only grow: {narrow.widths} → {wide.widths}")


def _in_out_axes(module: nn.Module) -> tuple[int, int]:
    """(input-channel axis, output-channel axis) of a weight tensor."""
    return (0, 1) if isinstance(module, nn.ConvTranspose2d) else (1, 0)


@torch.no_grad()
def widen(model: PtychoNet, wide_cfg: NetworkConfig, seed: int = 0) -> PtychoNet:
    """A `wide_cfg` network whose outputs equal `model`'s on every input (to float round-off)."""
    _same_shape_family(model.cfg, wide_cfg)
    torch.manual_seed(seed)
    wide = build_network(wide_cfg)
    old = dict(model.named_modules())
    for name, dst in wide.named_modules():
        if not isinstance(dst, (nn.Conv2d, nn.ConvTranspose2d)):
            continue
        src = old[name]
        i_ax, o_ax = _in_out_axes(dst)
        n_in, n_out = src.weight.shape[i_ax], src.weight.shape[o_ax]
        w = dst.weight
        # new inputs → old outputs: zero, so old channels ignore the new ones
        idx: list[slice] = [slice(None)] * w.dim()
        idx[i_ax], idx[o_ax] = slice(n_in, None), slice(0, n_out)
        w[tuple(idx)] = 0.0
        idx[i_ax], idx[o_ax] = slice(0, n_in), slice(0, n_out)
        w[tuple(idx)] = src.weight
        if dst.bias is not None:
            dst.bias[:n_out] = src.bias
            dst.bias[n_out:] = 0.0
    return wide
