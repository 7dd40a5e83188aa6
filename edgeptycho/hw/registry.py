"""Backend registry: name → lazily imported class, availability probes, opening (no silent fallback), device profiles.

Adding a device family = one file in hw/, one profile YAML in hw/profiles/ and one line in BACKENDS.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import ConfigError, from_mapping, load_yaml
from .base import Backend, BackendUnavailable

log = logging.getLogger(__name__)

BACKENDS: dict[str, str] = {
    "cpu": "edgeptycho.hw.cpu:CpuBackend",
    "jetson": "edgeptycho.hw.jetson:JetsonBackend",
    "alveo": "edgeptycho.hw.alveo:AlveoBackend",
    "cuda": "edgeptycho.hw.cuda:CudaBackend",
    "jetson-emu": "edgeptycho.hw.emulators:JetsonEmuBackend",
    "alveo-emu": "edgeptycho.hw.emulators:AlveoEmuBackend",
}

PROFILES_DIR = Path(__file__).parent / "profiles"
PRECISIONS = ("fp32", "fp16", "int8")


def backend_class(name: str) -> type[Backend]:
    """Import and return the class registered as `name`."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend '{name}'; known: {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def list_backends() -> list[dict[str, Any]]:
    """Every registered backend with availability here: name, available, reason, fix, precisions, profile, summary."""
    rows = []
    for name in BACKENDS:
        row: dict[str, Any] = {"name": name, "available": False, "reason": "", "fix": "",
                               "precisions": [], "profile": None, "summary": ""}
        try:
            cls = backend_class(name)
        except ImportError as exc:  # our own module failed to import: a packaging bug, reported not hidden
            row["reason"] = f"module {BACKENDS[name]} failed to import: {exc}"
            rows.append(row)
            continue
        row.update(precisions=list(cls.precisions), profile=cls.profile,
                   summary=(cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else "")
        try:
            cls.probe()
            row["available"] = True
        except BackendUnavailable as exc:
            row["reason"], row["fix"] = exc.reason, exc.fix
        rows.append(row)
    return rows


def open_backend(name: str, model_path: str | Path, batch_size: int, precision: str | None = None,
                 **opts: Any) -> Backend:
    """Open backend `name`; raises BackendUnavailable at once (reason + fix) if its SDK or device is missing.

    `model_path` is a file or a zoo name ('default', 'tiny', …). `precision` defaults to the backend's first
    (fp32 where supported; int8 on alveo/alveo-emu). Never falls back: see open_with_fallback.
    """
    cls = backend_class(name)
    cls.probe()
    return cls(_resolve_model(model_path), batch_size, precision or cls.precisions[0], **opts)


def open_with_fallback(names: list[str | tuple[str, str]], model_path: str | Path, batch_size: int,
                       precision: str | None = None, **opts: Any) -> Backend:
    """Open the first usable of `names` (each a name or (name, precision)); each fallback is logged at WARNING.

    A backend that lacks the requested precision counts as unavailable: precision never changes silently.
    """
    failures = []
    for i, entry in enumerate(names):
        name, prec = entry if isinstance(entry, tuple) else (entry, precision)
        try:
            cls = backend_class(name)
            prec = prec or cls.precisions[0]
            if prec not in cls.precisions:
                raise BackendUnavailable(name, f"does not support precision '{prec}' (has {cls.precisions})")
            backend = open_backend(name, model_path, batch_size, prec, **opts)
        except BackendUnavailable as exc:
            failures.append(f"{name}: {exc.reason}")
            nxt = names[i + 1] if i + 1 < len(names) else None
            log.warning("backend '%s' unavailable (%s)%s", name, exc.reason,
                        f"; falling back to '{nxt if isinstance(nxt, str) else nxt[0]}'" if nxt else "")
            continue
        return backend
    raise BackendUnavailable("+".join(n if isinstance(n, str) else n[0] for n in names), "; ".join(failures))


def _resolve_model(model_path: str | Path) -> Path:
    p = Path(model_path)
    if p.exists():
        return p
    from ..model.artifact import resolve

    return resolve(model_path)


# --- device profiles ----------------------------------------------------------------------------------------
@dataclass
class BatchLimits:
    """Batch sizes: `default` for serving, `max` tested/allowed, `static` when the device compiles one in."""

    default: int
    max: int
    static: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.default <= self.max:
            raise ValueError(f"batch: need 1 <= default ({self.default}) <= max ({self.max})")
        if self.static is not None and self.static < 1:
            raise ValueError(f"batch.static must be >= 1, got {self.static}")


@dataclass
class PowerSensor:
    """One way to read power on the device; `detail` names the path, rail or command."""

    kind: Literal["ina3221", "tegrastats", "jtop", "pyxrt", "xbutil", "nvidia-smi", "nvml", "rapl", "none"]
    detail: str = ""


@dataclass
class DeviceProfile:
    """What a device offers: memory, batch limits, precisions, power sensors, expected software versions."""

    name: str
    description: str
    memory_gib: float
    memory_kind: Literal["host", "unified", "discrete", "fpga-ddr"]
    batch: BatchLimits
    precisions: list[str]
    power_sensors: list[PowerSensor]
    software: dict[str, str]
    typical_power_w: float | None = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad or not self.precisions:
            raise ValueError(f"precisions must be a non-empty subset of {PRECISIONS}, got {self.precisions}")
        if self.memory_gib <= 0:
            raise ValueError(f"memory_gib must be > 0, got {self.memory_gib}")
        self.software = {str(k): str(v) for k, v in self.software.items()}


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """Load and validate hw/profiles/<name>.yaml (or a YAML path); ConfigError names a bad key."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILES_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown device profile '{name_or_path}'; known: {', '.join(profile_names())}")
    return from_mapping(DeviceProfile, load_yaml(path), "")
