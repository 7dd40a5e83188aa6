"""Simulated training sets: preprocessed patterns and phase-referenced patch labels in sharded NPZ + a manifest."""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import subprocess
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..physics import forward, objects, probes
from ..physics.fourier import EV, wavelength_from_energy
from .network import DataSpec, Preset, load_preset
from .preprocess import preprocess_into

FORMAT = 1
MANIFEST = "manifest.json"


def probe_weight(modes: np.ndarray, m: int) -> np.ndarray:
    """(M, M) loss/stitch weight: Σ_k |P_k|² over the central M×M of the probe window, peak 1.

    The same weight the stitcher blends with (pipeline.stitcher.probe_weight), so the phase reference of
    the labels is the one stitching assumes.
    """
    from ..pipeline.stitcher import probe_weight as _pw

    return _pw(modes, m)


def reference_phase(patches: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Phase (N, M, M) of complex patches with each one's weight-weighted circular mean phase removed."""
    z = patches / np.maximum(np.abs(patches), 1e-12)
    mean = np.einsum("nij,ij->n", z, weight.astype(np.complex64))
    ref = np.exp(-1j * np.angle(mean)).astype(np.complex64)
    return np.angle(patches * ref[:, None, None]).astype(np.float32)


def _uniform(rng: np.random.Generator, lo_hi: list[float]) -> float:
    return float(rng.uniform(lo_hi[0], lo_hi[1]))


def draw_probe(rng: np.random.Generator, data: DataSpec, n: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Unit-power incoherent probe modes (K, n, n) drawn from the spec's ranges, and the parameters drawn.

    Zone-plate defocus is always positive (sample downstream of focus), and Gaussian wavefronts always
    curve the same way: a probe and its complex conjugate give point-inverted but otherwise identical
    patterns for the twin object conj(O(−r)), so mixing both signs would make the labels ambiguous.
    """
    wavelength = wavelength_from_energy(data.energy_eV * EV)
    info: dict[str, Any] = {}
    if rng.random() < data.zone_plate_fraction:
        dr = _uniform(rng, data.outer_zone_m)
        beam = _uniform(rng, data.beam_px)
        # defocused zone-plate beam ≈ 2·NA·z = λz/Δr across (the 90 %-energy diameter adds the focal spot:
        # 0–30 % more for these ranges; the diameter reached is recorded in the chunk's probe_info)
        defocus = beam * data.pixel_m * dr / wavelength
        stop = _uniform(rng, data.central_stop)
        base = probes.zone_plate_probe(n, data.pixel_m, wavelength, 160e-6, dr, stop, defocus)
        info.update(kind="zone-plate", outer_zone_m=dr, defocus_m=defocus, central_stop=stop)
    else:
        fwhm = _uniform(rng, data.gaussian_fwhm_px)
        curv = fwhm * float(rng.uniform(0.8, 1.5))
        base = probes.gaussian_probe(n, fwhm, curv)
        info.update(kind="gaussian", fwhm_px=fwhm, curvature_px=curv)
    k = int(rng.integers(1, data.max_modes + 1))
    blur = _uniform(rng, data.coherence_blur_px)
    modes = probes.normalize_probe(probes.incoherent_modes(base, k, blur), 1.0)
    info.update(n_modes=k, coherence_blur_px=blur, diameter_px=probes.probe_diameter_px(modes))
    return modes, info


def draw_object(rng: np.random.Generator, kind: str, data: DataSpec, side: int) -> np.ndarray:
    params: dict[str, Any] = {}
    if kind == "siemens-star":
        params["n_spokes"] = int(rng.integers(16, 64))
    elif kind == "ic":
        params["feature_px"] = float(rng.uniform(3.0, 10.0))
    elif kind == "cells":
        params["cell_px"] = float(rng.uniform(20.0, 80.0))
    else:
        params["alpha"] = float(rng.uniform(2.5, 3.8))
    return objects.make_object(kind, side, int(rng.integers(2**31)), _uniform(rng, data.phase_range),
                               _uniform(rng, data.amplitude_min), **params)


def draw_positions(rng: np.random.Generator, data: DataSpec, side: int, n: int, count: int) -> np.ndarray:
    """(count, 2) sub-pixel window centres inside a side² object: uniform, except a `centre_fraction` share
    uniform over the disc of `centre_radius_px` about the centre (clipped so every window stays inside)."""
    lo, hi = n // 2 + 1, side - n // 2 - 2
    pos = rng.uniform(lo, hi, size=(count, 2))
    k = int(round(data.centre_fraction * count))
    if k:
        r = data.centre_radius_px * np.sqrt(rng.random(k))  # uniform over the disc's area
        t = rng.uniform(0.0, 2.0 * np.pi, k)
        pos[:k] = np.clip((side - 1) / 2.0 + np.stack([r * np.sin(t), r * np.cos(t)], axis=1), lo, hi)
    return pos


def make_chunk(preset: Preset, seq: np.random.SeedSequence, index: int, n_samples: int) -> dict[str, np.ndarray]:
    """`n_samples` training pairs sharing one random object and one random probe, all from `seq`.

    Patterns are simulated at the full frame size with per-sample Poisson dose and sub-pixel positions,
    then preprocessed exactly as at inference (preprocess_into, float16). Labels are the central M×M patch
    of the probe window (extract_patches, sub-pixel), phase with the probe-weighted circular mean removed.
    """
    data, n = preset.data, preset.frame_size
    m = preset.network.output_size
    rng = np.random.default_rng(seq)
    kind = data.kinds[index % len(data.kinds)]  # balanced kinds; everything else random
    side = data.object_windows * n
    obj = draw_object(rng, kind, data, side)
    modes, info = draw_probe(rng, data, n)
    pos = draw_positions(rng, data, side, n, n_samples)
    intensity = forward.diffraction_intensity(obj, modes, pos)
    log_dose = rng.uniform(np.log10(data.dose[0]), np.log10(data.dose[1]), n_samples)
    noise_rng = np.random.default_rng(rng.integers(2**63))
    counts = np.empty(intensity.shape, np.uint32)
    for i in range(n_samples):
        # unit-power probe: a pattern's expected sum is the transmitted fraction; scale it to 10^log_dose
        dose = float(10.0 ** log_dose[i]) * float(intensity[i].sum())
        counts[i] = forward.add_noise(intensity[i:i + 1], dose, rng=noise_rng)[0]
    size = preset.network.input_size
    x = np.empty((n_samples, 1, size, size), np.float16)
    preprocess_into(counts, x, preset.preprocess)
    weight = probe_weight(modes, m)
    patches = forward.extract_patches(obj, pos, m)
    return {
        "inputs": x,
        "amplitude": np.abs(patches).astype(np.float16),
        "phase": reference_phase(patches, weight).astype(np.float16),
        "weight": weight.astype(np.float16)[None],
        "chunk": np.full(n_samples, index, np.int32),
        "positions": pos.astype(np.float32),
        "log10_dose": log_dose.astype(np.float32),
        "kind": np.full(n_samples, data.kinds.index(kind), np.int8),
        "probe_info": np.frombuffer(json.dumps(info).encode(), np.uint8)[None].copy(),
    }


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> str:
    """Uncompressed NPZ with fixed zip timestamps (same arrays → same bytes); returns its sha256."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            body = io.BytesIO()
            np.lib.format.write_array(body, np.ascontiguousarray(arr), allow_pickle=False)
            zf.writestr(info, body.getvalue())
    blob = buf.getvalue()
    path.write_bytes(blob)
    return hashlib.sha256(blob).hexdigest()


def _merge(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    out = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0] if k != "probe_info"}
    infos = [bytes(c["probe_info"][0]).decode() for c in chunks]
    out["probe_info"] = np.frombuffer(json.dumps(infos).encode(), np.uint8).copy()
    return out


def code_version() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"{__version__}+{rev}" if rev else __version__


def _chunk_job(args: tuple[dict[str, Any], np.random.SeedSequence, int, int]) -> dict[str, np.ndarray]:
    preset_dict, seq, index, count = args
    from .network import preset_from_dict

    return make_chunk(preset_from_dict(preset_dict), seq, index, count)


@dataclass
class DatasetInfo:
    """What generate() wrote."""

    out: Path
    n: int
    shards: list[str]
    manifest: dict[str, Any]


def generate(preset: Preset | str, n: int, out: str | Path, seed: int = 0, shard_size: int = 4096,
             workers: int = 1, progress: bool = True) -> DatasetInfo:
    """Write `n` pairs for `preset` into `out`/shard_#####.npz plus manifest.json; deterministic from `seed`.

    Chunk c draws from SeedSequence(seed).spawn(...)[c], so the data do not depend on `workers`; shards hold
    whole chunks (shard_size is rounded to a multiple of the chunk size).
    """
    # the command records what was asked for: a preset YAML path, not just the name inside it
    preset_arg = str(preset) if isinstance(preset, (str, Path)) else preset.name
    preset = load_preset(preset) if isinstance(preset, (str, Path)) else preset
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    chunk = preset.data.chunk
    per_shard = max(1, shard_size // chunk) * chunk
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).exists():
        raise FileExistsError(f"{out} already holds a dataset ({MANIFEST}); choose a new --out")
    counts = [min(chunk, n - i) for i in range(0, n, chunk)]
    seqs = np.random.SeedSequence(seed).spawn(len(counts))
    jobs = [(preset.to_dict(), seqs[c], c, counts[c]) for c in range(len(counts))]
    chunks_per_shard = per_shard // chunk
    shards: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, unit="pair", desc=f"dataset {preset.name}")
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        results = pool.map(_chunk_job, jobs) if pool else map(_chunk_job, jobs)
        pending: list[dict[str, np.ndarray]] = []
        for c, res in enumerate(results):
            pending.append(res)
            if bar is not None:
                bar.update(len(res["chunk"]))
            if len(pending) == chunks_per_shard or c == len(jobs) - 1:
                name = f"shard_{len(shards):05d}.npz"
                arrays = _merge(pending)
                digest = save_npz(out / name, arrays)
                shards.append({"file": name, "n": int(len(arrays["chunk"])), "sha256": digest})
                pending = []
    finally:
        if pool:
            pool.shutdown()
        if bar is not None:
            bar.close()
    manifest = {
        "format": FORMAT,
        "preset": preset.name,
        "seed": seed,
        "n": n,
        "chunk": chunk,
        "shard_size": per_shard,
        "shards": shards,
        "frame_size": preset.frame_size,
        "input_size": preset.network.input_size,
        "output_size": preset.network.output_size,
        "preprocess": preset.preprocess.to_dict(),
        "physics": asdict(preset.data),
        "labels": "amplitude |O| and phase arg O of the central output_size² patch of the probe window "
                  "(sub-pixel), phase minus its probe-intensity-weighted circular mean; weight = Σ|P|² "
                  "(peak 1) over that patch, one per chunk",
        "code_version": code_version(),
        "command": f"edgeptycho dataset --preset-model {preset_arg} --n {n} --out {out} --seed {seed} "
                   f"--shard-size {per_shard}",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return DatasetInfo(out, n, [s["file"] for s in shards], manifest)


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    mf = path / MANIFEST if path.is_dir() else path
    if not mf.is_file():
        raise FileNotFoundError(f"no dataset manifest at {mf}; generate one with `edgeptycho dataset`")
    return json.loads(mf.read_text())


def load_shards(root: str | Path, files: list[str]) -> dict[str, np.ndarray]:
    """Concatenate the arrays of some shards in memory (float16 stays float16); chunk ids index `weight`."""
    root = Path(root)
    parts: list[dict[str, np.ndarray]] = []
    for name in files:
        with np.load(root / name, allow_pickle=False) as z:
            parts.append({k: z[k] for k in ("inputs", "amplitude", "phase", "weight", "chunk")})
    out = {k: np.concatenate([p[k] for p in parts]) for k in ("inputs", "amplitude", "phase", "weight")}
    # chunk ids are global and sorted within a shard; map them to rows of the concatenated weight array
    index, offset = [], 0
    for p in parts:
        index.append(np.searchsorted(np.unique(p["chunk"]), p["chunk"]) + offset)
        offset += len(p["weight"])
    out["weight_index"] = np.concatenate(index).astype(np.int64)
    out["chunk"] = np.concatenate([p["chunk"] for p in parts])
    return out
