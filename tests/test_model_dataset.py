"""Simulated training sets: reproducible from the seed, phase labels referenced as the stitcher assumes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeptycho.model.dataset import generate, load_shards, read_manifest, reference_phase
from edgeptycho.model.network import load_preset
from edgeptycho.model.preprocess import PreprocessSpec


def _small_tiny():
    preset = load_preset("tiny")
    preset.data.chunk = 32  # small chunks keep the test fast; the physics is unchanged
    return preset


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    a = generate(_small_tiny(), 96, root / "a", seed=7, shard_size=64, progress=False)
    b = generate(_small_tiny(), 96, root / "b", seed=7, shard_size=64, progress=False)
    c = generate(_small_tiny(), 96, root / "c", seed=8, shard_size=64, progress=False)
    return a, b, c


def test_same_seed_identical_shards(sets):
    a, b, c = sets
    ma, mb, mc = (read_manifest(x.out) for x in sets)
    assert [s["sha256"] for s in ma["shards"]] == [s["sha256"] for s in mb["shards"]]
    for f in a.shards:
        assert (a.out / f).read_bytes() == (b.out / f).read_bytes()
    assert ma["shards"][0]["sha256"] != mc["shards"][0]["sha256"]


def test_manifest_and_arrays(sets):
    a = sets[0]
    m = json.loads((a.out / "manifest.json").read_text())
    assert m["seed"] == 7 and m["n"] == 96 and sum(s["n"] for s in m["shards"]) == 96
    assert len(m["shards"]) == 2  # 64 pairs (two chunks of 32) per shard
    assert PreprocessSpec.from_dict(m["preprocess"]) == load_preset("tiny").preprocess
    for key in ("physics", "code_version", "command", "labels"):
        assert key in m
    d = load_shards(a.out, a.shards)
    assert d["inputs"].shape == (96, 1, 64, 64) and d["inputs"].dtype == np.float16
    assert d["amplitude"].shape == d["phase"].shape == (96, 32, 32)
    assert d["weight"].shape == (3, 32, 32) and d["weight_index"].max() == 2
    # preprocessed like the inference path: log1p / frame mean → each pattern's mean is 1
    assert np.allclose(d["inputs"].astype(np.float32).mean(axis=(1, 2, 3)), 1.0, atol=2e-3)
    assert np.abs(d["phase"].astype(np.float32)).max() <= np.pi + 1e-3


def test_label_phase_reference_is_weighted_circular_mean(sets):
    a = sets[0]
    d = load_shards(a.out, a.shards)
    w = d["weight"][d["weight_index"]].astype(np.float32)
    z = np.exp(1j * d["phase"].astype(np.float32))
    mean = np.angle((w * z).sum(axis=(1, 2)))
    assert np.abs(mean).max() < 0.01  # float16 labels: ~1e-3 rad


def test_reference_phase_removes_any_offset():
    rng = np.random.default_rng(0)
    phase = rng.uniform(-1, 1, (16, 16))[None]
    weight = rng.random((16, 16)).astype(np.float32)
    patches = (0.8 * np.exp(1j * (phase + np.array([0.0, 1.0, -2.5, 3.0])[:, None, None]))).astype(np.complex64)
    ref = reference_phase(patches, weight)
    assert np.allclose(ref, ref[0], atol=1e-5)  # the offsets are gone
    assert abs(np.angle((weight * np.exp(1j * ref)).sum(axis=(1, 2)))).max() < 1e-5


def test_existing_dataset_is_not_overwritten(sets):
    with pytest.raises(FileExistsError):
        generate(_small_tiny(), 32, sets[0].out, seed=1, progress=False)
