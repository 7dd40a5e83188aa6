"""Model artifacts: an ONNX file plus a JSON sidecar of metadata; loading refuses a file whose sha256 differs."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .preprocess import PreprocessSpec

ZOO = Path(__file__).parent / "zoo"
DEFAULT_MODEL = "default"  # alias resolved through zoo/aliases.json

REQUIRED_KEYS = ("name", "version", "architecture", "input_size", "output_size", "preprocess", "sha256")


class ModelHashMismatch(ValueError):
    """The ONNX file is not the one its metadata describes."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ModelArtifact:
    """A loaded, hash-checked model: `path` is the ONNX file, `metadata` its sidecar.

    The CNN maps one preprocessed pattern (1, input_size, input_size) to amplitude and phase of the central
    output_size × output_size object patch of the probe window, at pixel size
    full-frame object pixel × preprocess.pixel_size_factor(frame size).
    """

    path: Path
    metadata: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.metadata["name"])

    @property
    def sha256(self) -> str:
        return str(self.metadata["sha256"])

    @property
    def preprocess(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(self.metadata["preprocess"])

    @property
    def input_size(self) -> int:
        return int(self.metadata["input_size"])

    @property
    def output_size(self) -> int:
        return int(self.metadata["output_size"])

    @classmethod
    def load(cls, name_or_path: str | Path, check_hash: bool = True) -> ModelArtifact:
        """Load by zoo name ('default', 'cpu-default', 'tiny', …) or by path to an .onnx file."""
        onnx_path = resolve(name_or_path)
        meta_path = onnx_path.with_suffix(".json")
        if not meta_path.is_file():
            raise FileNotFoundError(f"model metadata not found beside {onnx_path}: expected {meta_path}")
        metadata = json.loads(meta_path.read_text())
        missing = [k for k in REQUIRED_KEYS if k not in metadata]
        if missing:
            raise ValueError(f"{meta_path}: metadata lacks required keys {missing}")
        if check_hash:
            actual = sha256_file(onnx_path)
            if actual != metadata["sha256"]:
                raise ModelHashMismatch(
                    f"{onnx_path}: sha256 {actual[:16]}… does not match its metadata {metadata['sha256'][:16]}…; "
                    "refusing a model file that is not the one described"
                )
        return cls(onnx_path, metadata)


def resolve(name_or_path: str | Path) -> Path:
    """Zoo name or path → path of the .onnx file."""
    p = Path(name_or_path)
    if p.suffix == ".onnx" or p.exists():
        if not p.is_file():
            raise FileNotFoundError(f"model file not found: {p}")
        return p
    name = str(name_or_path)
    aliases_file = ZOO / "aliases.json"
    aliases = json.loads(aliases_file.read_text()) if aliases_file.is_file() else {}
    name = aliases.get(name, name)
    candidate = ZOO / f"{name}.onnx"
    if not candidate.is_file():
        known = sorted({q.stem for q in ZOO.glob("*.onnx")} | set(aliases))
        raise FileNotFoundError(f"unknown model '{name_or_path}'; shipped models: {', '.join(known) or 'none'}")
    return candidate


def write_artifact(onnx_path: str | Path, metadata: dict[str, Any]) -> ModelArtifact:
    """Write the JSON sidecar for `onnx_path` with its sha256 filled in."""
    onnx_path = Path(onnx_path)
    meta = dict(metadata)
    meta["sha256"] = sha256_file(onnx_path)
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ValueError(f"metadata lacks required keys {missing}")
    onnx_path.with_suffix(".json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return ModelArtifact(onnx_path, meta)


def list_models() -> list[dict[str, Any]]:
    """Metadata of every shipped model."""
    return [json.loads(p.read_text()) for p in sorted(ZOO.glob("*.json")) if p.name != "aliases.json"]
