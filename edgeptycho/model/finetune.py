"""Transfer learning on a measured scan: labels cut from an iterative reconstruction, a held-out spatial block."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..physics.forward import extract_patches
from .artifact import ModelArtifact
from .dataset import reference_phase
from .export import export_checkpoint, model_from_onnx
from .network import preset_from_dict
from .preprocess import preprocess
from .train import PairData, evaluate, train_step, wrap_phase

# Fourier sub-pixel extraction pads windows by 4 px; windows must lie this far inside the reconstruction.
_EDGE = 4


@dataclass
class FinetuneSettings:
    epochs: int = 10
    batch: int = 32
    lr: float = 3e-4
    holdout: float = 0.2   # fraction of positions in the held-out spatial block (the right-most strip)
    val_fraction: float = 0.1  # of the remaining positions, to choose the epoch (never the held-out block)
    seed: int = 0
    threads: int = 2


def spatial_split(positions_px: np.ndarray, holdout: float, guard_px: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) position indices: the held-out block is the `holdout` fraction of positions with the
    largest column; training positions within `guard_px` of it are dropped so no training patch overlaps it."""
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    col = positions_px[:, 1]
    cut = float(np.quantile(col, 1.0 - holdout))
    held = np.flatnonzero(col >= cut)
    train = np.flatnonzero(col < cut - guard_px)
    if len(train) == 0 or len(held) == 0:
        raise ValueError(f"scan too narrow to hold out {holdout:.0%} of it with a {guard_px:.0f}-px guard band")
    return train, held


def build_pairs(scan: Any, recon: Any, art: ModelArtifact, weight: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Preprocessed frames and phase-referenced labels at every usable scan position of `recon`.

    Returns (arrays for PairData, the scan indices used, their positions in reconstruction pixels)."""
    factor = art.preprocess.pixel_size_factor(scan.frame_size)
    dx = scan.object_pixel_m * factor
    if abs(recon.pixel_m / dx - 1.0) > 0.01:
        raise ValueError(f"reconstruction pixel {recon.pixel_m * 1e9:.2f} nm differs from the model's "
                         f"{dx * 1e9:.2f} nm for this scan; resample the reconstruction first")
    m = art.output_size
    pos = (np.asarray(scan.positions_m) - np.asarray(recon.origin_m)) / recon.pixel_m
    h, w = recon.object.shape
    lo = m // 2 + _EDGE
    ok = (pos[:, 0] >= lo) & (pos[:, 1] >= lo) & (pos[:, 0] < h - m + lo - 1) & (pos[:, 1] < w - m + lo - 1)
    idx = np.flatnonzero(ok)
    if len(idx) < 10:
        raise ValueError(f"only {len(idx)} scan positions have their {m}×{m} patch inside the reconstruction")
    patches = extract_patches(np.asarray(recon.object), pos[idx], m)
    frames = np.asarray(scan.frames[()])[idx] if hasattr(scan.frames, "shape") else scan.frames[idx]
    arrays = {
        "inputs": preprocess(frames, art.preprocess, scan.mask).astype(np.float16),
        "amplitude": np.abs(patches).astype(np.float16),
        "phase": reference_phase(patches, weight).astype(np.float16),
        "weight": weight[None].astype(np.float16),
        "weight_index": np.zeros(len(idx), np.int64),
    }
    return arrays, idx, pos[idx]


def heldout_metrics(model: torch.nn.Module, data: PairData, preset: Any) -> dict[str, float]:
    """Probe-weighted L1 loss parts plus the probe-weighted RMS phase error (rad) over the held-out patches."""
    out = evaluate(model, data, preset)
    model.eval()
    num = den = 0.0
    with torch.no_grad():
        for s in range(0, len(data), 128):
            x, _, ph_t, w = data.batch(np.arange(s, min(len(data), s + 128)))
            _, ph = model(x)
            d2 = wrap_phase(ph - ph_t) ** 2
            w = torch.ones_like(d2) if w is None else w
            num += float((d2 * w).sum())
            den += float(w.sum())
    out["phase_rms_rad"] = math.sqrt(num / max(den, 1e-12))
    return out


def finetune(model_name: str | Path, scan: Any, recon: Any, out: str | Path, settings: FinetuneSettings,
             name: str | None = None, reproduce: list[str] | None = None,
             log: Callable[[str], None] = print) -> tuple[ModelArtifact, dict[str, Any]]:
    """Fine-tune a zoo model (weights rebuilt from its ONNX) on `scan` with labels from `recon`; export it."""
    from ..commands.reconstruct import stitch_weight

    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    art = ModelArtifact.load(model_name)
    preset = preset_from_dict(art.metadata["architecture"])
    model = model_from_onnx(art)
    probe = scan.probe if scan.probe is not None else recon.probe
    weight, weight_source = stitch_weight(art, probe, scan.frame_size)
    arrays, used, pos = build_pairs(scan, recon, art, weight)
    train_idx, held_idx = spatial_split(pos, settings.holdout, guard_px=art.output_size)
    rng = np.random.default_rng(settings.seed)
    perm = rng.permutation(train_idx)
    n_val = max(1, int(round(settings.val_fraction * len(perm))))
    val_idx, fit_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    weighting = preset.training.probe_weighting
    fit, val, held = (PairData(arrays, r, weighting) for r in (fit_idx, val_idx, held_idx))
    if len(fit) < settings.batch:
        raise ValueError(f"{len(fit)} training patches is less than one batch of {settings.batch}")
    before = heldout_metrics(model, held, preset)
    log(f"fine-tuning {art.name} on {len(fit)} patches ({len(val)} to choose the epoch, {len(held)} held out in "
        f"a spatial block); held-out before: L1 {before['loss']:.4f}, phase RMS {before['phase_rms_rad']:.4f} rad")
    steps = len(fit) // settings.batch
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings.epochs * steps, eta_min=settings.lr / 50)
    best_val, best_state, best_epoch = evaluate(model, val, preset)["loss"], None, 0
    history = []
    for epoch in range(1, settings.epochs + 1):
        t0 = time.perf_counter()
        order = np.random.default_rng([settings.seed, epoch]).permutation(len(fit))
        model.train()
        total = 0.0
        for s in range(steps):
            total += train_step(model, opt, sched, fit.batch(order[s * settings.batch:(s + 1) * settings.batch]),
                                preset)
        v = evaluate(model, val, preset)
        history.append({"epoch": epoch, "train_loss": total / steps, "val_loss": v["loss"],
                        "seconds": time.perf_counter() - t0})
        if v["loss"] < best_val:
            best_val, best_epoch = v["loss"], epoch
            best_state = {k: t.clone() for k, t in model.state_dict().items()}
        log(f"epoch {epoch}/{settings.epochs}: train {total / steps:.4f}  validation {v['loss']:.4f}"
            f"{'  * best' if best_epoch == epoch else ''}")
    if best_state is not None:
        model.load_state_dict(best_state)
    after = heldout_metrics(model, held, preset)
    log(f"held-out after: L1 {after['loss']:.4f}, phase RMS {after['phase_rms_rad']:.4f} rad "
        f"(best epoch {best_epoch})")
    report = {"model": art.name, "model_sha256": art.sha256, "n_train": len(fit), "n_val": len(val),
              "n_heldout": len(held), "n_positions_used": int(len(used)), "stitch_weight": weight_source,
              "heldout_before": before, "heldout_after": after, "best_epoch": best_epoch, "history": history,
              "settings": asdict(settings)}
    ckpt = {"preset": preset.to_dict(), "model": model.state_dict(), "epoch": best_epoch, "best_epoch": best_epoch,
            "best_val": best_val, "best_val_parts": {}, "history": history,
            "recipe": {"finetune": asdict(settings), "base_model": art.name, "base_sha256": art.sha256,
                       "base_training": art.metadata.get("training", {})},
            "data": {"finetune_scan": str(getattr(scan, "path", "") or ""), "truth": recon.program,
                     "base_data": art.metadata.get("data", {})},
            "reproduce": reproduce or []}
    torch.save(ckpt, out / "finetuned.pt")
    new_name = name or f"{art.name}-ft"
    metrics = {f"heldout_before_{k}": v for k, v in before.items()}
    metrics.update({f"heldout_after_{k}": v for k, v in after.items()})
    artifact, diff = export_checkpoint(out / "finetuned.pt", out / f"{new_name}.onnx", name=new_name,
                                       reproduce=reproduce, extra_metrics=metrics)
    report["export_max_abs_diff"] = diff
    return artifact, report
