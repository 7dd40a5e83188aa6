"""Replay sources: frames from memory (ArraySource) or a CXI/HDF5 file read lazily (ReplaySource), paced."""

from __future__ import annotations

import abc
import contextlib
import logging
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..ring import RingClosed
from .base import Pacer, RingWriter, Source, SourceStats

log = logging.getLogger(__name__)

# (frames (k, H, W), frame ids (k,), positions px (k, 2) | None, positions m (k, 2) | None)
Block = tuple[np.ndarray, np.ndarray, "np.ndarray | None", "np.ndarray | None"]
_FRAME_PATHS = ("entry_1/data_1/data", "entry_1/instrument_1/detector_1/data")


@contextlib.contextmanager
def open_frames(path: Path) -> Iterator[tuple[Any, np.ndarray | None, np.ndarray | None]]:
    """(frames h5py dataset, positions px (N, 2) | None, positions m (N, 2) | None) of a scan file, lazily."""
    import h5py

    try:
        from edgeptycho.io.cxi import open_scan
    except ImportError:  # a build without io: frames only
        open_scan = None
    if open_scan is not None:
        try:
            scan = open_scan(path)
        except ValueError as exc:
            log.warning("replay %s: %s; replaying frames without positions", path, exc)
        else:
            with scan:
                yield scan.frames, scan.positions_m / scan.object_pixel_m, scan.positions_m
            return
    with h5py.File(path, "r") as f:
        key = next((p for p in _FRAME_PATHS if p in f and isinstance(f[p], h5py.Dataset)), None)
        if key is None or f[key].ndim != 3:
            raise ValueError(f"replay {path}: no (N, H, W) frames at {' or '.join(_FRAME_PATHS)}")
        yield f[key], None, None


class _BlockSource(Source):
    """Feeds blocks of frames into a ring at `rate_hz` (None = as fast as the ring takes them)."""

    def __init__(self, rate_hz: float | None = None, series_id: int = 0, first_id: int = 0,
                 close_at_end: bool = True):
        super().__init__()
        Pacer(rate_hz)  # validates the rate now, not in the worker thread
        self.rate_hz, self.series_id, self.first_id, self.close_at_end = rate_hz, series_id, first_id, close_at_end

    @abc.abstractmethod
    def _blocks(self) -> Iterator[Block]:
        """Blocks of consecutive frames with their ids and positions, read lazily."""

    def run(self, ring: RingWriter, stop: threading.Event) -> SourceStats:
        pacer, stats, nan2 = Pacer(self.rate_hz), self.stats, (math.nan, math.nan)
        try:  # whatever happens, the consumer learns that the input is over
            spec = self.frame_spec()
            if spec is not None:
                shape, dtype = spec
                if tuple(shape) != tuple(ring.frame_shape):
                    raise ValueError(f"{self.name}: frames {tuple(shape)} do not fit ring slots {ring.frame_shape}")
                if not np.can_cast(dtype, ring.dtype, "safe"):
                    raise ValueError(f"{self.name}: frame dtype {dtype} cannot be stored losslessly as {ring.dtype}")
            block = pacer.period == 0 and hasattr(ring, "acquire_many")
            for frames, ids, pos_px, pos_m in self._blocks():
                if block:  # unpaced into a local ring: slots taken, filled and committed a run at a time
                    if not self._write_block(ring, stop, frames, ids, pos_px, pos_m):
                        return stats
                    continue
                ids_l = ids.tolist()
                px_l = pos_px.tolist() if pos_px is not None else None
                m_l = pos_m.tolist() if pos_m is not None else None
                for k in range(len(frames)):
                    if stop.is_set():
                        return stats
                    t_det = pacer.wait(stop)
                    slot = ring.acquire_write(stop=stop)
                    if slot is None and stop.is_set():  # a shutdown, not a drop
                        return stats
                    stats.sent += 1
                    if slot is None:
                        ring.drop(ids_l[k])
                        stats.dropped += 1
                        continue
                    np.copyto(ring.slot_view(slot), frames[k], casting="safe")
                    ring.commit(slot, ids_l[k], series_id=self.series_id,
                                position_px=px_l[k] if px_l else nan2, position_m=m_l[k] if m_l else nan2,
                                t_detector=t_det)
                    stats.received += 1
            ring.mark_end(self.series_id)
        except RingClosed:
            log.info("%s: ring closed by its owner after %d frames", self.name, stats.sent)
        finally:
            stats.late = pacer.late
            if self.close_at_end:
                ring.close_input()
        return stats


    def _write_block(self, ring: Any, stop: threading.Event, frames: np.ndarray, ids: np.ndarray,
                     pos_px: np.ndarray | None, pos_m: np.ndarray | None) -> bool:
        """One block through ring.acquire_many / commit_many (one lock and one wake-up per run of slots,
        not per frame); False when `stop` ended it. Drops are per frame, exactly as in the paced path."""
        stats, k, n = self.stats, 0, len(frames)
        while k < n:
            if stop.is_set():
                return False
            slots = ring.acquire_many(n - k, stop=stop)
            if not slots:
                if stop.is_set():  # a shutdown, not a drop
                    return False
                stats.sent += 1
                ring.drop(int(ids[k]))
                stats.dropped += 1
                k += 1
                continue
            m = len(slots)
            for i, j, view in ring.segments(np.asarray(slots)):  # usually one run of consecutive slots
                np.copyto(view, frames[k + i:k + j], casting="safe")
            ring.commit_many(slots, ids[k:k + m], self.series_id,
                             None if pos_px is None else pos_px[k:k + m], None if pos_m is None else pos_m[k:k + m])
            stats.sent += m
            stats.received += m
            k += m
        return True


class ArraySource(_BlockSource):
    """Frames held in memory (tests, demo). positions in object pixels (row, col) and/or metres (y, x)."""

    name = "array"

    def __init__(self, frames: np.ndarray, positions_px: np.ndarray | None = None,
                 positions_m: np.ndarray | None = None, rate_hz: float | None = None, series_id: int = 0,
                 first_id: int = 0, block: int = 64, close_at_end: bool = True):
        super().__init__(rate_hz, series_id, first_id, close_at_end)
        frames = np.asarray(frames)
        if frames.ndim != 3:
            raise ValueError(f"frames must be (N, H, W), got shape {frames.shape}")
        for label, pos in (("positions_px", positions_px), ("positions_m", positions_m)):
            if pos is not None and np.shape(pos) != (len(frames), 2):
                raise ValueError(f"{label} must be ({len(frames)}, 2), got {np.shape(pos)}")
        self.frames, self.block = frames, max(1, int(block))
        self.positions_px = None if positions_px is None else np.asarray(positions_px, np.float64)
        self.positions_m = None if positions_m is None else np.asarray(positions_m, np.float64)

    @classmethod
    def from_scan(cls, scan: Any, **options: Any) -> ArraySource:
        """From a physics.types.ScanData: positions in metres and in full-frame object pixels."""
        return cls(scan.frames, positions_px=scan.positions_px(), positions_m=scan.positions_m, **options)

    def frame_spec(self) -> tuple[tuple[int, int], np.dtype]:
        return (int(self.frames.shape[1]), int(self.frames.shape[2])), self.frames.dtype

    def _blocks(self) -> Iterator[Block]:
        for a in range(0, len(self.frames), self.block):
            b = min(a + self.block, len(self.frames))
            yield (self.frames[a:b], np.arange(self.first_id + a, self.first_id + b),
                   None if self.positions_px is None else self.positions_px[a:b],
                   None if self.positions_m is None else self.positions_m[a:b])


class ReplaySource(_BlockSource):
    """A CXI scan replayed from disk chunk by chunk (the file is never loaded whole), positions from the file.

    Geometry and positions come from edgeptycho.io.cxi.open_scan; an HDF5 file without CXI geometry is
    replayed from its frame dataset alone (positions NaN).
    """

    name = "replay"

    def __init__(self, path: str | Path, rate_hz: float | None = None, series_id: int = 0, first_id: int = 0,
                 start_frame: int = 0, stop_frame: int | None = None, chunk_frames: int | None = None,
                 close_at_end: bool = True):
        super().__init__(rate_hz, series_id, first_id, close_at_end)
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"replay: no such file {self.path}")
        self.start_frame, self.stop_frame, self.chunk_frames = int(start_frame), stop_frame, chunk_frames
        with open_frames(self.path) as (dset, _, _):
            self._shape = (int(dset.shape[1]), int(dset.shape[2]))
            self._dtype = dset.dtype
            self.n_frames = len(range(*slice(self.start_frame, self.stop_frame).indices(dset.shape[0])))

    def frame_spec(self) -> tuple[tuple[int, int], np.dtype]:
        return self._shape, np.dtype(self._dtype)

    def _blocks(self) -> Iterator[Block]:
        with open_frames(self.path) as (dset, pos_px, pos_m):
            n_total = dset.shape[0]
            first, last, _ = slice(self.start_frame, self.stop_frame).indices(n_total)
            # Whole HDF5 chunks (each decompressed once), ≥ 16 frames per read, at most ~16 MiB of scratch.
            per_frame = int(np.prod(dset.shape[1:])) * dset.dtype.itemsize
            c = dset.chunks[0] if dset.chunks else 1
            step = self.chunk_frames or c * -(-16 // c)
            step = max(1, min(int(step), (16 << 20) // max(per_frame, 1)))
            scratch = np.empty((step, *dset.shape[1:]), dset.dtype)
            for a in range(first, last, step):
                b = min(a + step, last)
                dset.read_direct(scratch, np.s_[a:b], np.s_[0:b - a])
                yield (scratch[:b - a], np.arange(self.first_id + a, self.first_id + b),
                       None if pos_px is None else pos_px[a:b], None if pos_m is None else pos_m[a:b])
