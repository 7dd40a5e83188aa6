"""CPU training of a preset on a simulated set: probe-weighted L1 losses, held-out validation, resumable checkpoints."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .dataset import load_shards, read_manifest
from .network import Preset, PtychoNet, build_network, load_preset, preset_from_dict

CHECKPOINT_LAST = "last.pt"
CHECKPOINT_BEST = "best.pt"


def wrap_phase(x: torch.Tensor) -> torch.Tensor:
    """Wrap to [−π, π): phase differences are compared modulo 2π."""
    return torch.remainder(x + math.pi, 2 * math.pi) - math.pi


def patch_loss(amp: torch.Tensor, phase: torch.Tensor, amp_t: torch.Tensor, phase_t: torch.Tensor,
               weight: torch.Tensor | None, amp_w: float = 1.0, phase_w: float = 1.0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, amplitude L1, wrapped-phase L1), each a weighted mean over pixels and the batch.

    `weight` (B, 1, M, M) is the probe intensity over the patch: the pixels the pattern says something about,
    and the same weight the stitcher blends them with. None = uniform.
    """
    da = (amp - amp_t).abs()
    dp = wrap_phase(phase - phase_t).abs()
    if weight is not None:
        norm = weight.mean(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
        da = da * weight / norm
        dp = dp * weight / norm
    la, lp = da.mean(), dp.mean()
    return amp_w * la + phase_w * lp, la, lp


@dataclass
class TrainSettings:
    """Resolved training options (preset recipe overridden by the command line)."""

    epochs: int
    batch: int
    lr: float
    seed: int = 0
    threads: int = 2
    max_steps: int | None = None  # stop early (tests); the LR schedule still spans `epochs`
    val_shards: int | None = None


@dataclass
class TrainResult:
    best_val: float
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    out: Path = Path(".")


class PairData:
    """The shards of one split held in memory as float16; batches are gathered and cast per step."""

    def __init__(self, arrays: dict[str, np.ndarray], rows: np.ndarray, probe_weighting: bool):
        self.a = arrays
        self.rows = rows
        self.weighting = probe_weighting

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, ...]:
        r = self.rows[np.sort(idx)]
        x = torch.from_numpy(self.a["inputs"][r].astype(np.float32))
        amp = torch.from_numpy(self.a["amplitude"][r].astype(np.float32))[:, None]
        ph = torch.from_numpy(self.a["phase"][r].astype(np.float32))[:, None]
        w = None
        if self.weighting:
            w = torch.from_numpy(self.a["weight"][self.a["weight_index"][r]].astype(np.float32))[:, None]
        return x, amp, ph, w


def split_data(data_dir: Path, manifest: dict[str, Any], val_fraction: float, val_shards: int | None
               ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, list[str]]:
    """Held-out validation by whole chunks (objects + probes never seen in training): the last shards, or the
    last chunks of a single-shard set. Returns arrays, train rows, val rows, validation shard names."""
    files = [s["file"] for s in manifest["shards"]]
    arrays = load_shards(data_dir, files)
    chunk_ids = arrays["chunk"]
    if len(files) >= 2:
        k = val_shards or max(1, int(round(val_fraction * len(files))))
        k = min(k, len(files) - 1)
        val_files = files[-k:]
        n_val = sum(s["n"] for s in manifest["shards"][-k:])
        is_val = np.arange(len(chunk_ids)) >= len(chunk_ids) - n_val  # shards are concatenated in order
    else:
        uniq = np.unique(chunk_ids)
        if len(uniq) < 2:
            raise ValueError(f"{data_dir}: one chunk only; need at least two chunks to hold one out for validation")
        first_val = int(uniq[-max(1, int(round(val_fraction * len(uniq))))])
        val_files = [f"{files[0]} (chunks >= {first_val})"]
        is_val = chunk_ids >= first_val
    return arrays, np.flatnonzero(~is_val), np.flatnonzero(is_val), val_files


def evaluate(model: PtychoNet, data: PairData, preset: Preset, batch: int = 128) -> dict[str, float]:
    model.eval()
    tot = {"loss": 0.0, "amp": 0.0, "phase": 0.0}
    with torch.no_grad():
        for s in range(0, len(data), batch):
            idx = np.arange(s, min(len(data), s + batch))
            x, amp_t, ph_t, w = data.batch(idx)
            amp, ph = model(x)
            loss, la, lp = patch_loss(amp, ph, amp_t, ph_t, w, preset.training.amplitude_weight,
                                      preset.training.phase_weight)
            for k, v in (("loss", loss), ("amp", la), ("phase", lp)):
                tot[k] += float(v) * len(idx)
    model.train()
    return {k: v / max(1, len(data)) for k, v in tot.items()}


def train_step(model: PtychoNet, opt: torch.optim.Optimizer, sched: Any, batch: tuple[torch.Tensor, ...],
               preset: Preset) -> float:
    """One optimiser step on (x, amplitude, phase, weight); returns the loss."""
    x, amp_t, ph_t, w = batch
    amp, ph = model(x)
    loss, _, _ = patch_loss(amp, ph, amp_t, ph_t, w, preset.training.amplitude_weight, preset.training.phase_weight)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def _scheduler(opt: torch.optim.Optimizer, kind: str, lr: float, total: int) -> torch.optim.lr_scheduler.LRScheduler:
    if kind == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(total, 2), pct_start=0.15,
                                                   div_factor=20.0, final_div_factor=200.0)
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1), eta_min=lr / 200)


def plot_history(history: list[dict[str, Any]], steps: list[tuple[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if steps:
        s, v = zip(*steps, strict=True)
        ax.plot(np.array(s) / max(1, history[0]["steps"] if history else 1), v, lw=0.6, alpha=0.6,
                label="train (per 20 steps)")
    ep = [h["epoch"] for h in history]
    ax.plot(ep, [h["train_loss"] for h in history], "o-", label="train (epoch mean)")
    ax.plot(ep, [h["val_loss"] for h in history], "s-", label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("weighted L1 amplitude + phase")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def warm_start(init: str | Path, preset: Preset, seed: int = 0) -> tuple[PtychoNet, str]:
    """The weights `init` names (a best.pt/last.pt checkpoint, an .onnx artifact or a zoo name) as a `preset`
    network: as they are for the same architecture, widened without changing the outputs (model.grow) for a
    narrower member of the family; anything else is refused. Returns the network and a line saying what."""
    p = Path(init)
    if p.suffix == ".pt":
        start = torch.load(p, map_location="cpu", weights_only=True)
        src_preset = preset_from_dict(start["preset"])
        model = build_network(src_preset.network)
        model.load_state_dict(start["model"])
        what = f"{p} (epoch {start['epoch']}, validation {start['best_val']:.4f})"
    else:
        from .artifact import ModelArtifact
        from .export import model_from_onnx

        art = ModelArtifact.load(init)  # a zoo name or an .onnx path; the sha256 is checked
        model, src_preset = model_from_onnx(art), preset_from_dict(art.metadata["architecture"])
        what = f"{art.path} ({art.name} {art.metadata.get('version', '')})"
    if src_preset.network == preset.network:
        return model.train(), what
    from .grow import widen

    try:
        wide = widen(model, preset.network, seed)
    except ValueError as exc:
        raise ValueError(f"--init {init} is a '{src_preset.name}' network that preset '{preset.name}' cannot "
                         f"start from: {exc}") from None
    return wide.train(), f"{what}, widened {src_preset.network.widths} → {preset.network.widths}"


def train(preset: Preset | str, data_dir: str | Path, out: str | Path, settings: TrainSettings,
          resume: str | Path | None = None, progress: bool = True,
          log: Callable[[str], None] = print, reproduce: list[str] | None = None,
          init: str | Path | None = None) -> TrainResult:
    """Train; writes last.pt (every epoch, for --resume), best.pt (lowest validation loss), history.json and
    loss_curve.png into `out`. With `resume`, the preset, optimiser, scheduler, epoch and RNG come from it.
    With `init`, only the weights come from that checkpoint (a warm start: the optimiser, schedule and
    epochs are new), so a model trained on a broad probe family can be specialised on a narrower one."""
    torch.set_num_threads(settings.threads)
    data_dir, out = Path(data_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = torch.load(resume, map_location="cpu", weights_only=True) if resume else None
    if ckpt is not None:
        preset = preset_from_dict(ckpt["preset"])
        settings = TrainSettings(**{**ckpt["settings"], "max_steps": settings.max_steps,
                                    "threads": settings.threads})
    preset = load_preset(preset) if isinstance(preset, str) else preset
    manifest = read_manifest(data_dir)
    for key, want in (("input_size", preset.network.input_size), ("output_size", preset.network.output_size),
                      ("preprocess", preset.preprocess.to_dict())):
        if manifest[key] != want:
            raise ValueError(f"dataset {data_dir} has {key}={manifest[key]} but preset '{preset.name}' needs {want}")
    torch.manual_seed(settings.seed)
    arrays, train_rows, val_rows, val_files = split_data(data_dir, manifest, preset.training.val_fraction,
                                                         settings.val_shards)
    weighting = preset.training.probe_weighting
    train_data, val_data = PairData(arrays, train_rows, weighting), PairData(arrays, val_rows, weighting)
    steps_per_epoch = len(train_data) // settings.batch
    if steps_per_epoch < 1:
        raise ValueError(f"{len(train_data)} training pairs is less than one batch of {settings.batch}")
    model = build_network(preset.network)
    if init is not None and ckpt is None:
        model, what = warm_start(init, preset, settings.seed)
        log(f"initialised weights from {what}")
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=preset.training.weight_decay)
    sched = _scheduler(opt, preset.training.schedule, settings.lr, settings.epochs * steps_per_epoch)
    start_epoch, best_val, best_epoch = 1, math.inf, 0
    history: list[dict[str, Any]] = []
    step_log: list[tuple[int, float]] = []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng_torch"])
        start_epoch, best_val, best_epoch = ckpt["epoch"] + 1, ckpt["best_val"], ckpt["best_epoch"]
        history, step_log = list(ckpt["history"]), [tuple(s) for s in ckpt["step_log"]]
        log(f"resumed from {resume} at epoch {start_epoch} (best validation {best_val:.4f} at epoch {best_epoch})")
    recipe = {**asdict(preset.training), **asdict(settings), "optimizer": "Adam", "val_shards": val_files,
              "n_train": len(train_data), "n_val": len(val_data), "steps_per_epoch": steps_per_epoch,
              "torch": str(torch.__version__), "init": str(init) if init else None}
    data_summary = {k: manifest[k] for k in ("preset", "seed", "n", "frame_size", "physics", "code_version",
                                             "command") if k in manifest}
    data_summary["dir"] = str(data_dir)
    log(f"training {preset.name}: {len(train_data)} train / {len(val_data)} validation pairs, "
        f"{settings.epochs} epochs × {steps_per_epoch} steps, batch {settings.batch}, lr {settings.lr}, "
        f"{settings.threads} threads")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=settings.epochs * steps_per_epoch, initial=(start_epoch - 1) * steps_per_epoch,
                   unit="step", desc=f"train {preset.name}", mininterval=2.0)
    global_step = (start_epoch - 1) * steps_per_epoch
    best_parts = ckpt.get("best_val_parts", {}) if ckpt else {}
    model.train()
    try:
        for epoch in range(start_epoch, settings.epochs + 1):
            t0 = time.perf_counter()
            # the permutation depends only on (seed, epoch): a resumed run sees the same batches
            order = np.random.default_rng([settings.seed, epoch]).permutation(len(train_data))
            run_loss, run_n = 0.0, 0
            for s in range(steps_per_epoch):
                run_loss += train_step(model, opt, sched,
                                       train_data.batch(order[s * settings.batch:(s + 1) * settings.batch]), preset)
                run_n += 1
                global_step += 1
                if global_step % 20 == 0:
                    step_log.append((global_step, run_loss / run_n))
                if bar is not None:
                    bar.update(1)
                    if s % 20 == 0:
                        bar.set_postfix(loss=f"{run_loss / run_n:.4f}", lr=f"{sched.get_last_lr()[0]:.1e}")
                if settings.max_steps is not None and global_step >= settings.max_steps:
                    break
            val = evaluate(model, val_data, preset)
            entry = {"epoch": epoch, "steps": steps_per_epoch, "train_loss": run_loss / max(1, run_n),
                     "val_loss": val["loss"], "val_amp": val["amp"], "val_phase": val["phase"],
                     "lr": sched.get_last_lr()[0], "seconds": time.perf_counter() - t0}
            history.append(entry)
            improved = val["loss"] < best_val
            if improved:  # the checkpoint is chosen on VALIDATION loss, never on training loss
                best_val, best_epoch, best_parts = val["loss"], epoch, {"amp": val["amp"], "phase": val["phase"]}
            state = {
                "preset": preset.to_dict(), "settings": asdict(settings), "model": model.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch,
                "rng_torch": torch.get_rng_state(), "best_val": best_val, "best_epoch": best_epoch,
                "best_val_parts": best_parts, "history": history, "step_log": step_log, "recipe": recipe,
                "data": data_summary, "reproduce": reproduce or [],
            }
            torch.save(state, out / CHECKPOINT_LAST)
            if improved:
                torch.save({k: v for k, v in state.items() if k not in ("optimizer", "scheduler")},
                           out / CHECKPOINT_BEST)
            (out / "history.json").write_text(json.dumps({"history": history, "best_epoch": best_epoch,
                                                          "best_val": best_val}, indent=2) + "\n")
            plot_history(history, step_log, out / "loss_curve.png")
            log(f"epoch {epoch}/{settings.epochs}: train {entry['train_loss']:.4f}  validation {val['loss']:.4f} "
                f"(amp {val['amp']:.4f}, phase {val['phase']:.4f} rad){'  * best' if improved else ''}  "
                f"{entry['seconds']:.0f} s")
            if settings.max_steps is not None and global_step >= settings.max_steps:
                break
    finally:
        if bar is not None:
            bar.close()
    return TrainResult(best_val, best_epoch, history, out)
