"""Training: the loss falls, the kept checkpoint is the best on validation, and a resumed run continues exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeptycho.model import train as train_mod
from edgeptycho.model.dataset import generate, read_manifest
from edgeptycho.model.network import build_network, load_preset
from edgeptycho.model.train import (
    PairData,
    TrainSettings,
    evaluate,
    patch_loss,
    split_data,
    train,
    wrap_phase,
)


def _preset():
    preset = load_preset("tiny")
    preset.data.chunk = 32
    return preset


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "data"
    generate(_preset(), 128, out, seed=3, shard_size=64, progress=False)
    return out


def _settings(**kw):
    return TrainSettings(**{"epochs": 3, "batch": 16, "lr": 3e-3, "seed": 0, "threads": 1, **kw})


def test_wrapped_phase_loss():
    a = torch.tensor([3.1])
    b = torch.tensor([-3.1])
    assert abs(float(wrap_phase(a - b))) < 0.1  # 6.2 rad apart is 0.08 rad modulo 2π
    amp = torch.ones(1, 1, 2, 2)
    total, la, lp = patch_loss(amp, torch.zeros_like(amp), amp, torch.full_like(amp, 0.5), None)
    assert float(la) == 0 and abs(float(lp) - 0.5) < 1e-6 and abs(float(total) - 0.5) < 1e-6


def test_training_lowers_the_loss(tmp_path, data_dir):
    preset = _preset()
    arrays = train_mod.load_shards(data_dir, ["shard_00000.npz", "shard_00001.npz"])
    data = PairData(arrays, np.arange(64), True)
    torch.manual_seed(0)
    before = evaluate(build_network(preset.network), data, preset)["loss"]
    result = train(preset, data_dir, tmp_path, _settings(), progress=False, log=lambda s: None)
    assert result.history[-1]["train_loss"] < before
    assert result.best_val < before
    for name in ("best.pt", "last.pt", "history.json", "loss_curve.png"):
        assert (tmp_path / name).is_file()


def test_checkpoint_is_chosen_on_validation_loss(tmp_path, data_dir, monkeypatch):
    val_losses = iter([0.5, 0.3, 0.4])  # epoch 2 is best on validation; training loss keeps falling

    def fake_eval(model, data, preset, batch=128):
        v = next(val_losses)
        return {"loss": v, "amp": v / 2, "phase": v / 2}

    monkeypatch.setattr(train_mod, "evaluate", fake_eval)
    result = train(_preset(), data_dir, tmp_path, _settings(), progress=False, log=lambda s: None)
    assert result.best_epoch == 2 and result.best_val == 0.3
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert best["epoch"] == 2 and last["epoch"] == 3 and best["best_val"] == 0.3


def test_resume_continues_where_it_stopped(tmp_path, data_dir):
    full = train(_preset(), data_dir, tmp_path / "full", _settings(), progress=False, log=lambda s: None)
    steps = full.history[0]["steps"]
    part = train(_preset(), data_dir, tmp_path / "part", _settings(max_steps=2 * steps), progress=False,
                 log=lambda s: None)
    assert [h["epoch"] for h in part.history] == [1, 2]
    resumed = train(_preset(), data_dir, tmp_path / "part", _settings(), resume=tmp_path / "part" / "last.pt",
                    progress=False, log=lambda s: None)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=True)["model"]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert resumed.history[-1]["val_loss"] == pytest.approx(full.history[-1]["val_loss"], rel=1e-5)


def test_dataset_for_another_preset_is_refused(tmp_path, data_dir):
    with pytest.raises(ValueError, match="input_size"):
        train(load_preset("cpu-default"), data_dir, tmp_path, _settings(), progress=False, log=lambda s: None)


def test_init_warm_starts_from_weights_only(tmp_path, data_dir):
    first = train(_preset(), data_dir, tmp_path / "a", _settings(epochs=2), progress=False, log=lambda s: None)
    warm = train(_preset(), data_dir, tmp_path / "b", _settings(epochs=1), progress=False, log=lambda s: None,
                 init=tmp_path / "a" / "best.pt")
    assert [h["epoch"] for h in warm.history] == [1]  # a fresh schedule, not a resume
    # a warm start carries on from where the source run ended, well below a cold start's first epoch
    cold = train(_preset(), data_dir, tmp_path / "c", _settings(epochs=1), progress=False, log=lambda s: None)
    assert warm.history[0]["val_loss"] < min(cold.history[0]["val_loss"], 1.2 * first.best_val)
    ckpt = torch.load(tmp_path / "b" / "best.pt", weights_only=True)
    assert ckpt["recipe"]["init"].endswith("best.pt")


def test_init_refuses_another_architecture(tmp_path, data_dir):
    train(_preset(), data_dir, tmp_path / "a", _settings(epochs=1), progress=False, log=lambda s: None)
    deeper, narrower = _preset(), _preset()
    deeper.network.encoder_blocks = 2
    narrower.network.widths = [max(1, w // 2) for w in narrower.network.widths]
    for other, why in ((deeper, "only widths may differ"), (narrower, "widths may only grow")):
        with pytest.raises(ValueError, match=why):
            train(other, data_dir, tmp_path / "b", _settings(epochs=1), progress=False, log=lambda s: None,
                  init=tmp_path / "a" / "best.pt")


def test_init_grows_a_shipped_model_into_a_wider_preset(tmp_path, data_dir):
    """`--init tiny` on a wider tiny: the zoo's weights, widened, start where the shipped model is."""
    wide = _preset()
    wide.network.widths = [w * 2 for w in wide.network.widths]
    lines: list[str] = []
    res = train(wide, data_dir, tmp_path / "w", _settings(epochs=1, lr=1e-5), progress=False, log=lines.append,
                init="tiny")
    assert any("widened" in ln and "tiny" in ln for ln in lines)
    from edgeptycho.model.artifact import ModelArtifact
    from edgeptycho.model.export import model_from_onnx

    shipped = model_from_onnx(ModelArtifact.load("tiny"))
    arrays, _, val_rows, _ = split_data(data_dir, read_manifest(data_dir), wide.training.val_fraction, None)
    val = PairData(arrays, val_rows, True)
    # a tiny learning rate barely moves it: the widened start scores what the shipped model scores
    assert res.history[0]["val_loss"] == pytest.approx(evaluate(shipped, val, _preset())["loss"], rel=0.05)
