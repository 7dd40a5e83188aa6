"""Widening a trained network into a wider member of the family leaves its outputs unchanged and can learn."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from edgeptycho.model.grow import widen
from edgeptycho.model.network import build_network, load_preset


def _trained_like(cfg, seed=0):
    torch.manual_seed(seed)
    model = build_network(cfg)
    with torch.no_grad():  # Fixup zeroes each block's second conv: give every weight a value, as training would
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("upsample", ["convtranspose", "nearest-conv"])
@pytest.mark.parametrize("bottleneck", ["dense", "conv"])
def test_widened_network_computes_the_same_outputs(upsample, bottleneck):
    cfg = dataclasses.replace(load_preset("tiny").network, upsample=upsample, bottleneck=bottleneck)
    model = _trained_like(cfg)
    wide_cfg = dataclasses.replace(cfg, widths=[w + 3 for w in cfg.widths])
    wide = widen(model, wide_cfg).eval()
    assert sum(p.numel() for p in wide.parameters()) > sum(p.numel() for p in model.parameters())
    x = torch.rand(3, 1, cfg.input_size, cfg.input_size) * 2
    with torch.no_grad():
        a, p = model(x)
        a2, p2 = wide(x)
    assert torch.equal(a, a2) and torch.equal(p, p2)


def test_new_channels_receive_gradients():
    cfg = load_preset("tiny").network
    wide_cfg = dataclasses.replace(cfg, widths=[w * 2 for w in cfg.widths])
    wide = widen(_trained_like(cfg), wide_cfg).train()
    a, p = wide(torch.rand(2, 1, cfg.input_size, cfg.input_size))
    (a.mean() + p.mean()).backward()
    g = wide.phase_head.weight.grad[0, cfg.widths[0]:]  # the head's weights from the new channels
    assert g.abs().sum() > 0


def test_only_widths_may_change_and_only_grow():
    cfg = load_preset("tiny").network
    model = _trained_like(cfg)
    with pytest.raises(ValueError, match="only widths"):
        widen(model, dataclasses.replace(cfg, decoder_blocks=2))
    with pytest.raises(ValueError, match="only grow"):
        widen(model, dataclasses.replace(cfg, widths=[cfg.widths[0] - 1, *cfg.widths[1:]]))
