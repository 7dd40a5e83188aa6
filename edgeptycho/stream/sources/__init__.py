"""Frame sources behind one interface (Source.run(ring, stop)); look them up by name with make_source()."""

from __future__ import annotations

import importlib
from typing import Any

from .base import RingWriter, Source, SourceStats, SourceUnavailable

# name → (module in this package, class). Modules load on first use, so a missing optional library
# (pyverbs, cbor2, …) only affects its own source. A new source is one module and one line here.
SOURCES: dict[str, tuple[str, str]] = {
    "array": ("replay", "ArraySource"),
    "replay": ("replay", "ReplaySource"),
    "shm": ("shm", "ShmSource"),
    "tcp": ("tcp", "TcpSource"),
    "rdma": ("rdma", "RdmaSource"),
    "dectris-v1": ("dectris_v1", "DectrisV1Source"),
    "dectris-v2": ("dectris_v2", "DectrisV2Source"),
    "pva": ("pva", "PvaSource"),
}


def source_class(kind: str) -> type[Source]:
    """The Source class registered as `kind`; ValueError names the known kinds."""
    try:
        module, cls = SOURCES[kind]
    except KeyError:
        raise ValueError(f"unknown source '{kind}' (known: {', '.join(SOURCES)})") from None
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def make_source(kind: str, **options: Any) -> Source:
    """Build a source by name with its keyword options, e.g. make_source("replay", path=p, rate_hz=500)."""
    return source_class(kind)(**options)


__all__ = ["SOURCES", "RingWriter", "Source", "SourceStats", "SourceUnavailable", "make_source", "source_class"]
