"""Streaming core: the frame ring, frame sources, and the results stream (PUB schema + reference reader).

    from edgeptycho.stream import FrameRing, RingConfig, make_source, Publisher, Subscriber
"""

from __future__ import annotations

from typing import Any

from .ring import META_DTYPE, POLICIES, FrameBatch, FrameRing, RingClosed, RingConfig
from .sources import Source, SourceStats, SourceUnavailable, make_source, source_class

_LAZY = {"Publisher": "publish", "Subscriber": "publish", "StreamContext": "publish", "Message": "publish",
         "SchemaError": "publish"}


def __getattr__(name: str) -> Any:  # the results stream imports zmq: only when asked for
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "META_DTYPE", "POLICIES", "FrameBatch", "FrameRing", "RingClosed", "RingConfig", "Source", "SourceStats",
    "SourceUnavailable", "make_source", "source_class", *_LAZY,
]
