"""ONNX export of a trained checkpoint: dynamic batch, checked against PyTorch by ONNX Runtime, artifact sidecar."""

from __future__ import annotations

import copy
import datetime as _dt
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__ as _pkg_version
from .artifact import ModelArtifact, write_artifact
from .network import (
    INPUT_NAME,
    OUTPUT_NAMES,
    PtychoNet,
    build_network,
    count_parameters,
    flops,
    fold_batchnorm,
    preset_from_dict,
)

DEFAULT_OPSET = 17
EXPORT_TOLERANCE = 1e-4


def export_onnx(model: PtychoNet, path: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Write `model` (eval mode, BatchNorm folded) as ONNX with input 'diffraction' and a dynamic batch axis."""
    path = Path(path)
    model = fold_batchnorm(copy.deepcopy(model).eval().cpu())
    n = model.cfg.input_size
    dyn = {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of torch.export, but it keeps parameter names as
        # initializer names (weights can be rebuilt from the ONNX file) and needs no onnxscript at runtime.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.zeros(2, 1, n, n),), str(path), input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES), dynamic_axes=dyn, opset_version=opset, dynamo=False,
            do_constant_folding=True,
        )
    return path


def check_onnx(model: PtychoNet, path: str | Path, batches: tuple[int, ...] = (1, 5), seed: int = 0) -> float:
    """Max |ONNX Runtime − PyTorch| over both outputs on random inputs at each batch size."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = model.eval().cpu()
    rng = np.random.default_rng(seed)
    n = model.cfg.input_size
    worst = 0.0
    for b in batches:
        # Model inputs are log-scaled and normalised to a frame mean of 1: draw in that range.
        x = (rng.random((b, 1, n, n)) * 2.0).astype(np.float32)
        got = sess.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        with torch.no_grad():
            ref = model(torch.from_numpy(x))
        for g, r in zip(got, ref, strict=True):
            if g.shape != tuple(r.shape):
                raise RuntimeError(f"ONNX output shape {g.shape} differs from PyTorch {tuple(r.shape)}")
            worst = max(worst, float(np.max(np.abs(g - r.numpy()))))
    return worst


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint (our own files only: weights_only refuses arbitrary pickled objects)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def model_from_checkpoint(ckpt: dict[str, Any]) -> PtychoNet:
    preset = preset_from_dict(ckpt["preset"])
    model = build_network(preset.network)
    model.load_state_dict(ckpt["model"])
    return model.eval()


def model_from_onnx(artifact: ModelArtifact) -> PtychoNet:
    """Rebuild the PyTorch network of an artifact from its ONNX initializers (for fine-tuning a shipped model).

    Export folds BatchNorm, so this works for BatchNorm-free architectures (the family's default).
    """
    import onnx
    from onnx import numpy_helper

    preset = preset_from_dict(artifact.metadata["architecture"])
    if preset.network.batchnorm:
        raise ValueError(f"{artifact.path}: BatchNorm was folded on export; fine-tune from its .pt checkpoint")
    model = build_network(preset.network)
    graph = onnx.load(str(artifact.path)).graph
    tensors = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    # The exporter de-duplicates identical initializers behind Identity nodes; follow them back.
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in tensors:
            tensors[node.output[0]] = tensors[node.input[0]]
    state = model.state_dict()
    missing = [k for k in state if k not in tensors]
    if missing:
        raise ValueError(f"{artifact.path}: ONNX initializers lack {missing[:3]}…; not exported by edgeptycho")
    model.load_state_dict({k: torch.from_numpy(np.array(tensors[k])) for k in state})
    return model.eval()


def export_checkpoint(
    ckpt_path: str | Path,
    out: str | Path,
    opset: int = DEFAULT_OPSET,
    name: str | None = None,
    version: str | None = None,
    reproduce: list[str] | None = None,
    extra_metrics: dict[str, Any] | None = None,
) -> tuple[ModelArtifact, float]:
    """Checkpoint → ONNX + JSON sidecar; returns the artifact and the ONNX-vs-PyTorch max abs difference."""
    ckpt = load_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt)
    preset = preset_from_dict(ckpt["preset"])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(model, out, opset)
    diff = check_onnx(model, out)
    if diff > EXPORT_TOLERANCE:
        raise RuntimeError(f"ONNX Runtime differs from PyTorch by {diff:.2e} > {EXPORT_TOLERANCE:.0e}")
    metrics = {"val_loss": ckpt.get("best_val"), "val_amplitude_l1": ckpt.get("best_val_parts", {}).get("amp"),
               "val_phase_l1": ckpt.get("best_val_parts", {}).get("phase"), "export_max_abs_diff": diff}
    metrics.update(extra_metrics or {})
    meta = {
        "name": name or out.stem,
        "version": version or f"{_pkg_version}+{_dt.date.today().isoformat()}",
        "architecture": preset.to_dict(),
        "input_size": preset.network.input_size,
        "output_size": preset.network.output_size,
        "frame_size": preset.frame_size,
        "preprocess": preset.preprocess.to_dict(),
        "training": ckpt.get("recipe", {}),
        "data": ckpt.get("data", {}),
        "metrics": metrics,
        "parameters": count_parameters(model),
        "flops": flops(preset.network),
        "onnx_opset": opset,
        "reproduce": reproduce or ckpt.get("reproduce", []),
        "epoch": ckpt.get("best_epoch"),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return write_artifact(out, meta), diff
