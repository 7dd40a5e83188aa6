"""The FrameRing's API types: slot metadata layout, overload policies, settings, a leased batch, page prefault."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

__all__ = ["META_DTYPE", "POLICIES", "FrameBatch", "RingClosed", "RingConfig", "prefault"]

# One record per slot, apart from the payload. Positions: (row, col) object pixels and (y, x) metres;
# times: Unix epoch seconds (NaN = unknown); shape/nbytes: what the producer wrote into the slot.
META_DTYPE = np.dtype([
    ("frame_id", "<i8"), ("series_id", "<i8"),
    ("position_px", "<f8", (2,)), ("position_m", "<f8", (2,)),
    ("t_detector", "<f8"), ("t_received", "<f8"),
    ("nbytes", "<i8"), ("shape", "<i4", (2,)), ("flags", "<u4"),
])

POLICIES = ("backpressure", "free-running", "latest")
_PAGE = 4096


def prefault(array: np.ndarray) -> np.ndarray:
    """Write one zero byte per page of a freshly allocated contiguous array, so it is resident from the start.

    Anonymous and shared maps are mapped lazily: without this, the first lap of a 128-slot ring of 256² uint32
    frames took ~150 µs of page faults per frame in the source thread (measured), and the first batches'
    outputs faulted inside ONNX Runtime. Paying it once at allocation keeps it out of the hot path.
    """
    if array.nbytes and array.flags.c_contiguous and array.flags.writeable:
        array.reshape(-1).view(np.uint8)[::_PAGE] = 0
    return array


class RingClosed(RuntimeError):
    """The ring's input was closed (end of stream); producers must stop."""


@dataclass
class RingConfig:
    """Ring settings as they appear in YAML (`ring:`): slot count, overload policy, producer wait."""

    slots: int = 256
    policy: str = "backpressure"  # backpressure | free-running | latest
    timeout_s: float | None = 10.0  # backpressure: longest wait for a slot before the frame is dropped
    lost_log: int = 65536  # how many lost frame ids are remembered (counters are always exact)

    def __post_init__(self) -> None:
        if self.slots < 2:
            raise ValueError(f"slots must be >= 2, got {self.slots}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.timeout_s is not None and self.timeout_s < 0:
            raise ValueError(f"timeout_s must be >= 0 or null, got {self.timeout_s}")
        if self.lost_log < 0:
            raise ValueError(f"lost_log must be >= 0, got {self.lost_log}")


@dataclass
class FrameBatch:
    """Up to k frames leased by one take(): slot indices, a copy of their metadata, and end-of-series news."""

    slots: np.ndarray  # (k,) int64 — read ring.slab[slot] (or ring.segments(slots)); release(slots) after
    meta: np.ndarray  # (k,) META_DTYPE, a copy: safe to keep after release
    end_series: int | None = None  # set when this batch closes a series (flush the partial batch)
    closed: bool = False  # the input is closed and nothing is left: the stream is over

    def __len__(self) -> int:
        return len(self.slots)

    def __iter__(self) -> Iterator[tuple[int, np.void]]:
        """(slot, metadata record) per frame."""
        return zip(self.slots.tolist(), self.meta, strict=True)

    @property
    def frame_ids(self) -> np.ndarray:
        return self.meta["frame_id"]
