"""Scan positions by frame id — from the scan plan, a file or a ZeroMQ feed — joined to frames as they land."""

from __future__ import annotations

import json
import logging
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
_NAN2 = (math.nan, math.nan)


class PositionTable:
    """Positions (y, x) in metres by frame id, plus (row, col) object pixels when `pixel_m` is known.

    Written in bulk (scan plan, file) or incrementally from a feed thread; read lock-free by the receive
    thread at commit time (get) and by later stages (lookup) for frames whose position arrived late.
    Frame ids are the detector's image numbers within a series (0, 1, …), the same index as the scan plan.
    """

    def __init__(self, pixel_m: float | None = None, capacity: int = 1024, max_id: int = 1 << 26):
        if pixel_m is not None and not pixel_m > 0:
            raise ValueError(f"pixel_m must be > 0, got {pixel_m}")
        self.pixel_m, self.max_id = pixel_m, int(max_id)
        self._m = np.full((max(int(capacity), 1), 2), np.nan)
        self._lock = threading.Lock()
        self.known = 0

    def set(self, frame_ids: Any, positions_m: Any) -> None:
        """Store positions (n, 2) metres (y, x) for frame ids (n,); ids outside [0, max_id) raise ValueError."""
        ids = np.atleast_1d(np.asarray(frame_ids, dtype=np.int64))
        pos = np.asarray(positions_m, dtype=np.float64).reshape(-1, 2)
        if len(ids) != len(pos):
            raise ValueError(f"{len(ids)} frame ids for {len(pos)} positions")
        if len(ids) == 0:
            return
        if ids.min() < 0 or ids.max() >= self.max_id:
            raise ValueError(f"frame ids must lie in [0, {self.max_id}), got {ids.min()}..{ids.max()}")
        with self._lock:
            table = self._m
            need = int(ids.max()) + 1
            if need > len(table):  # grow by doubling into a new array; readers keep the old one meanwhile
                bigger = np.full((max(need, 2 * len(table)), 2), np.nan)
                bigger[:len(table)] = table
                table = bigger
            fresh = int(np.count_nonzero(np.isnan(table[ids, 0])))
            table[ids] = pos
            self._m = table
            self.known += fresh

    def get(self, frame_id: int) -> tuple[tuple[float, float], tuple[float, float]]:
        """(position_px, position_m) of one frame; NaNs when unknown (or no pixel size for px)."""
        table = self._m
        if not 0 <= frame_id < len(table):
            return _NAN2, _NAN2
        y, x = table[frame_id].tolist()
        if self.pixel_m is None or y != y:
            return _NAN2, (y, x)
        return (y / self.pixel_m, x / self.pixel_m), (y, x)

    def lookup(self, frame_ids: Any) -> tuple[np.ndarray, np.ndarray]:
        """(positions_px (n, 2), positions_m (n, 2)) for many frames; NaN rows where unknown."""
        ids = np.asarray(frame_ids, dtype=np.int64).reshape(-1)
        table = self._m
        out = np.full((len(ids), 2), np.nan)
        ok = (ids >= 0) & (ids < len(table))
        out[ok] = table[ids[ok]]
        px = out / self.pixel_m if self.pixel_m else np.full_like(out, np.nan)
        return px, out

    def __len__(self) -> int:
        return self.known

    # ---- constructors ---------------------------------------------------------------------------------
    @classmethod
    def from_array(cls, positions: Any, units: str = "m", pixel_m: float | None = None,
                   first_id: int = 0) -> PositionTable:
        """A scan plan: positions (N, 2) (y, x) in metres (units="m") or object pixels (units="px")."""
        pos = np.asarray(positions, dtype=np.float64)
        if pos.ndim != 2 or pos.shape[1] != 2:
            raise ValueError(f"positions must be (N, 2) (y, x), got shape {pos.shape}")
        if units == "px":
            if pixel_m is None:
                raise ValueError("positions in object pixels need pixel_m to be joined in metres")
            pos = pos * pixel_m
        elif units != "m":
            raise ValueError(f"units must be 'm' or 'px', got {units!r}")
        table = cls(pixel_m=pixel_m, capacity=len(pos) + first_id)
        table.set(np.arange(first_id, first_id + len(pos)), pos)
        return table

    @classmethod
    def from_file(cls, path: str | Path, pixel_m: float | None = None) -> PositionTable:
        """From a CXI scan (translation + its object pixel size), a .npy (N, 2) or a text/CSV file.

        Text rows are `y x` or `frame_id y x` in metres, separated by spaces or commas; '#' starts a comment.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"positions file not found: {path}")
        suffix = path.suffix.lower()
        if suffix in (".cxi", ".h5", ".hdf5", ".nxs"):
            from edgeptycho.io.cxi import open_scan

            with open_scan(path) as scan:
                return cls.from_array(scan.positions_m, pixel_m=pixel_m or scan.object_pixel_m)
        if suffix == ".npy":
            return cls.from_array(np.load(path, allow_pickle=False), pixel_m=pixel_m)
        rows = np.loadtxt(path, delimiter="," if suffix == ".csv" else None, ndmin=2, comments="#")
        if rows.shape[1] == 2:
            return cls.from_array(rows, pixel_m=pixel_m)
        if rows.shape[1] == 3:
            table = cls(pixel_m=pixel_m, capacity=int(rows[:, 0].max()) + 1 if len(rows) else 1)
            table.set(rows[:, 0].astype(np.int64), rows[:, 1:])
            return table
        raise ValueError(f"{path}: expected 2 (y x) or 3 (frame_id y x) columns, got {rows.shape[1]}")


class ZmqPositionFeed:
    """Fills a PositionTable from a ZeroMQ SUB (or PULL) socket of JSON messages, in a daemon thread.

    A message is `{"frame_id": 5, "position_m": [y, x]}` or a batch `{"frame_ids": [...], "positions_m":
    [[y, x], ...]}` (`position_px` / `positions_px` are accepted when the table knows pixel_m). Anything
    else is counted in `malformed` and skipped; nothing from the network is evaluated.
    """

    def __init__(self, table: PositionTable, endpoint: str, pattern: str = "sub", topic: bytes = b""):
        import zmq

        if pattern not in ("sub", "pull"):
            raise ValueError(f"pattern must be 'sub' or 'pull', got {pattern!r}")
        self.table, self.endpoint, self.malformed, self.received = table, endpoint, 0, 0
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.SUB if pattern == "sub" else zmq.PULL)
        self._topics = [topic] if pattern == "sub" else []
        if pattern == "sub":
            self._sock.setsockopt(zmq.SUBSCRIBE, topic)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="position-feed", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import zmq

        from .publish import close_receiver

        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(100):
                    continue
                parts = self._sock.recv_multipart()
                self.handle(parts[-1])
        finally:
            close_receiver(self._sock, self._topics)  # never mid-message: libzmq can abort the process

    def handle(self, payload: bytes) -> bool:
        """Apply one message; False (and counted) when it is not a position message."""
        try:
            if len(payload) > 1 << 24:
                raise ValueError("message too large")
            msg = json.loads(payload)
            if not isinstance(msg, dict):
                raise TypeError("not a JSON object")
            if "frame_ids" in msg:
                ids, m, px = msg["frame_ids"], msg.get("positions_m"), msg.get("positions_px")
            else:
                ids, m, px = [msg["frame_id"]], msg.get("position_m"), msg.get("position_px")
                m, px = (None if m is None else [m]), (None if px is None else [px])
            if m is not None:
                pos = np.asarray(m, dtype=np.float64)
            elif px is not None and self.table.pixel_m:
                pos = np.asarray(px, dtype=np.float64) * self.table.pixel_m
            else:
                raise ValueError("no position_m (or position_px with a known pixel size)")
            if not np.all(np.isfinite(pos)):
                raise ValueError("non-finite position")
            self.table.set(np.asarray(ids, dtype=np.int64), pos)
            self.received += len(ids)
            return True
        except (ValueError, KeyError, TypeError, IndexError, OverflowError) as exc:
            self.malformed += 1
            if self.malformed == 1 or self.malformed % 1000 == 0:
                log.warning("position feed %s: skipped %d malformed message(s) (last: %s)",
                            self.endpoint, self.malformed, exc)
            return False

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
