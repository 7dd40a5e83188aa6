"""FrameRing: one slab of fixed frame slots, handed out by index with leases, metadata kept beside the payload."""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from edgeptycho.hw.base import Allocator, HostAllocator

from .ring_types import META_DTYPE, POLICIES, FrameBatch, RingClosed, RingConfig, prefault

__all__ = ["META_DTYPE", "POLICIES", "FrameBatch", "FrameRing", "RingClosed", "RingConfig", "prefault"]

_FREE, _WRITING, _READY, _LEASED = 0, 1, 2, 3
_NAN2 = (math.nan, math.nan)
_END = -1  # marker in the ready queue: end of a series


class FrameRing:
    """Fixed slots in one preallocated slab; thread-safe for a producer and a consumer thread.

    Producer: slot = acquire_write(); write slot_view(slot) / slot_buffer(slot); commit(slot, frame_id, ...).
    Consumer: batch = take(k); read ring.slab[s] for s in batch.slots; release(batch.slots).
    A leased or half-written slot is never handed out again until released or aborted.
    """

    def __init__(self, n_slots: int, frame_shape: tuple[int, int], dtype: Any, allocator: Allocator | None = None,
                 policy: str = "backpressure", timeout_s: float | None = 10.0, lost_log: int = 65536):
        cfg = RingConfig(slots=n_slots, policy=policy, timeout_s=timeout_s, lost_log=lost_log)  # validates
        self.n_slots, self.policy, self.timeout_s = cfg.slots, cfg.policy, cfg.timeout_s
        self.frame_shape = tuple(int(s) for s in frame_shape)
        if len(self.frame_shape) != 2 or min(self.frame_shape) < 1:
            raise ValueError(f"frame_shape must be (H, W) with positive sizes, got {frame_shape}")
        self.dtype = np.dtype(dtype)
        self.allocator = allocator or HostAllocator()
        # The ONE payload allocation, made resident now rather than page by page during the first lap.
        self.slab = prefault(self.allocator.empty((n_slots, *self.frame_shape), self.dtype))
        # Frame id last written per slot, in allocator memory so a producer in another process can stamp it.
        self.stamps = self.allocator.empty((n_slots,), np.int64)
        # A shared-memory allocator names each array's segment (`names[i]` = i-th array): what ShmSource sends.
        names = getattr(self.allocator, "names", None)
        self.segment_names: tuple[str, str] | None = (names[-2], names[-1]) if names else None
        self.stamps[:] = -1
        self.meta = np.zeros(n_slots, META_DTYPE)
        self.slot_nbytes = int(np.prod(self.frame_shape)) * self.dtype.itemsize
        self._state = [_FREE] * n_slots
        self._gen = [0] * n_slots  # bumped on every acquire: lets unleased readers detect a lap
        self._free: collections.deque[int] = collections.deque(range(n_slots))  # FIFO keeps slots in order
        self._ready: collections.deque[int] = collections.deque()  # slots and _END markers, in commit order
        self._end_ids: collections.deque[int] = collections.deque()
        self._lost: collections.deque[int] = collections.deque(maxlen=cfg.lost_log)
        self._lock = threading.Lock()
        self._can_write = threading.Condition(self._lock)
        self._can_read = threading.Condition(self._lock)
        self._want = 0  # frames the waiting consumer asked for; commits notify only when reached
        self._writer_waiting = False
        self._release_hook: Callable[[int], None] | None = None
        self._closed = False
        self._last = -1
        self._n_ready = self._n_leased = 0
        self.received = self.dropped = self.overwritten = self.lapped = self.taken = self.high_water = 0

    @classmethod
    def from_config(cls, cfg: RingConfig, frame_shape: tuple[int, int], dtype: Any,
                    allocator: Allocator | None = None) -> FrameRing:
        return cls(cfg.slots, frame_shape, dtype, allocator, cfg.policy, cfg.timeout_s, cfg.lost_log)

    # --- producer ------------------------------------------------------------------------------------
    def acquire_write(self, timeout: float | None = None, stop: threading.Event | None = None) -> int | None:
        """A free slot index to fill, or None when the policy says drop (then call drop(frame_id)).

        backpressure waits up to `timeout` (default: the ring's timeout_s; None = forever, ending early
        when `stop` is set); free-running never waits; latest reclaims the oldest unread frame.
        """
        got = self.acquire_many(1, timeout, stop)
        return got[0] if got else None

    def acquire_many(self, n: int, timeout: float | None = None, stop: threading.Event | None = None) -> list[int]:
        """Up to `n` free slots at once (block writes): waits for the first as acquire_write does, then takes
        whatever else is free without waiting. Empty when the policy says drop (drop the next frame)."""
        if n < 1:
            raise ValueError(f"acquire_many needs n >= 1, got {n}")
        with self._lock:
            if self._closed:
                raise RingClosed("ring input is closed")
            if not self._free:
                if self.policy == "latest":
                    self._reclaim_oldest()
                elif self.policy == "backpressure":
                    self._wait_free(self.timeout_s if timeout is None else timeout, stop)
            return [self._hand_out() for _ in range(min(n, len(self._free)))]

    def try_acquire(self) -> int | None:
        """A free slot or None, never waiting or reclaiming (for proxies that hand slots out as credits)."""
        with self._lock:
            if self._closed:
                raise RingClosed("ring input is closed")
            return self._hand_out() if self._free else None

    def slot_view(self, slot: int) -> np.ndarray:
        """The (H, W) numpy view of one slot: write the frame here, in place."""
        return self.slab[slot]

    def slot_buffer(self, slot: int) -> memoryview:
        """A writable byte view of one slot, for sock.recv_into / readinto."""
        return memoryview(self.slab[slot]).cast("B")

    def commit(self, slot: int, frame_id: int, series_id: int = 0, position_px: Iterable[float] = _NAN2,
               position_m: Iterable[float] = _NAN2, t_detector: float = math.nan, t_received: float | None = None,
               flags: int = 0, nbytes: int | None = None) -> None:
        """Publish a filled slot with its metadata; the consumer sees frames in commit order."""
        if self._state[slot] != _WRITING:
            raise ValueError(f"commit of slot {slot} that was not acquired for writing")
        # The slot is ours until it is queued, so the record is written outside the lock.
        self.meta[slot] = (frame_id, series_id, position_px, position_m, t_detector,
                           time.time() if t_received is None else t_received,
                           self.slot_nbytes if nbytes is None else nbytes, self.frame_shape, flags)
        self.stamps[slot] = frame_id
        with self._lock:
            self._state[slot] = _READY
            self._ready.append(slot)
            self._last = slot
            self._n_ready += 1
            self.received += 1
            self.high_water = max(self.high_water, self._n_ready + self._n_leased)
            if self._want and self._n_ready >= self._want:
                self._can_read.notify()

    def commit_many(self, slots: list[int] | np.ndarray, frame_ids: np.ndarray, series_id: int = 0,
                    position_px: np.ndarray | None = None, position_m: np.ndarray | None = None,
                    t_detector: np.ndarray | float = math.nan, t_received: float | None = None) -> None:
        """commit() for k filled slots in one go: metadata written as arrays, one lock, one wake-up.

        position_px/position_m: (k, 2) or None (NaN); t_detector: (k,) or one value; t_received: now.
        """
        idx = np.asarray(slots, dtype=np.int64)
        k = len(idx)
        if k == 0:
            return
        if len(frame_ids) != k:
            raise ValueError(f"commit_many: {k} slots but {len(frame_ids)} frame ids")
        state = self._state
        if any(state[s] != _WRITING for s in idx.tolist()):
            raise ValueError(f"commit_many of slots {idx.tolist()} not all acquired for writing")
        rec = np.zeros(k, META_DTYPE)  # built apart, then stored with one fancy-index write
        rec["frame_id"], rec["series_id"] = frame_ids, series_id
        rec["position_px"] = math.nan if position_px is None else position_px
        rec["position_m"] = math.nan if position_m is None else position_m
        rec["t_detector"] = t_detector
        rec["t_received"] = time.time() if t_received is None else t_received
        rec["nbytes"], rec["shape"] = self.slot_nbytes, self.frame_shape
        self.meta[idx] = rec
        self.stamps[idx] = frame_ids
        with self._lock:
            for s in idx.tolist():
                state[s] = _READY
            self._ready.extend(idx.tolist())
            self._last = int(idx[-1])
            self._n_ready += k
            self.received += k
            self.high_water = max(self.high_water, self._n_ready + self._n_leased)
            if self._want and self._n_ready >= self._want:
                self._can_read.notify()

    def abort(self, slot: int) -> None:
        """Give back an acquired slot unwritten (malformed or cancelled frame)."""
        with self._lock:
            if self._state[slot] != _WRITING:
                raise ValueError(f"abort of slot {slot} that was not acquired for writing")
            self._state[slot] = _FREE
            self._free.appendleft(slot)
            self._notify_writer()

    def drop(self, frame_id: int) -> None:
        """Count a frame the producer could not place (no free slot); its id goes to the lost log."""
        with self._lock:
            self.dropped += 1
            self._lost.append(frame_id)

    def mark_end(self, series_id: int = 0) -> None:
        """End of a series (scan): the consumer's take() returns end_series after the frames before it."""
        with self._lock:
            self._ready.append(_END)
            self._end_ids.append(series_id)
            self._can_read.notify()

    def close_input(self) -> None:
        """No more frames will come (the source finished or stopped); waiting parties wake up."""
        with self._lock:
            self._closed = True
            self._can_read.notify_all()
            self._can_write.notify_all()

    # --- consumer ------------------------------------------------------------------------------------
    def take(self, max_n: int = 1, timeout: float | None = None, min_n: int = 1) -> FrameBatch:
        """Lease up to `max_n` committed frames, waiting until `min_n` are ready, an end marker, close or timeout.

        Never crosses an end-of-series marker; may return an empty batch (timeout, or a bare marker).
        """
        if max_n < 1 or min_n < 1:
            raise ValueError(f"take needs max_n >= 1 and min_n >= 1, got {max_n}, {min_n}")
        min_n = min(min_n, max_n)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            # Never wait for more frames than the slots this consumer does not hold could ever deliver.
            min_n = max(1, min(min_n, self.n_slots - self._n_leased))
            while self._n_ready < min_n and not self._end_ids and not self._closed:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._want = min_n
                self._can_read.wait(remaining)
            self._want = 0
            out: list[int] = []
            ready, state = self._ready, self._state
            while ready and len(out) < max_n and ready[0] != _END:
                slot = ready.popleft()
                state[slot] = _LEASED
                out.append(slot)
            end = None
            if ready and ready[0] == _END:
                ready.popleft()
                end = self._end_ids.popleft()
            n = len(out)
            self._n_ready -= n
            self._n_leased += n
            self.taken += n
            closed = self._closed and not ready
        slots = np.array(out, dtype=np.int64)
        return FrameBatch(slots, self.meta[slots], end, closed)

    def release(self, slots: int | Iterable[int]) -> None:
        """Return leased slots to the free list (the producer may then reuse them)."""
        items = [int(slots)] if np.ndim(slots) == 0 else [int(s) for s in slots]  # type: ignore[arg-type]
        with self._lock:
            state = self._state
            bad = [s for s in items if state[s] != _LEASED]
            if bad or len(set(items)) != len(items):
                raise ValueError(f"release of slots {bad or items} that are not leased (or named twice)")
            for s in items:
                state[s] = _FREE
            self._free.extend(items)
            self._n_leased -= len(items)
            self._notify_writer()
            hook = self._release_hook
        if hook is not None and items:
            hook(len(items))

    def verify(self, batch: FrameBatch) -> np.ndarray:
        """After reading a batch's payloads: True where the slot still holds the frame it was taken with.

        A False means a producer wrote the slot while it was leased (a misbehaving remote producer);
        it is counted in `lapped`. In-process producers cannot do that, so this is for shm/rdma sources.
        """
        ok = self.stamps[batch.slots] == batch.meta["frame_id"]
        bad = int(len(ok) - np.count_nonzero(ok))
        if bad:
            with self._lock:
                self.lapped += bad
        return ok

    def segments(self, slots: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
        """Split a batch's slots into runs of consecutive slots: [(i, j, slab[s_i : s_i + j - i]), ...].

        Slots are handed out round-robin, so a batch is usually one or two zero-copy slab views that can
        be preprocessed with one vectorised call each.
        """
        out: list[tuple[int, int, np.ndarray]] = []
        n = len(slots)
        if n == 0:
            return out
        breaks = np.flatnonzero(np.diff(slots) != 1) + 1
        starts = [0, *breaks.tolist()]
        ends = [*breaks.tolist(), n]
        for i, j in zip(starts, ends, strict=True):
            s0 = int(slots[i])
            out.append((i, j, self.slab[s0:s0 + (j - i)]))
        return out

    def peek_latest(self, out: np.ndarray) -> np.void | None:
        """Copy the newest committed frame into `out` without a lease (monitors, dashboards).

        Returns its metadata, or None when nothing was committed or the producer reused the slot during
        the copy (a lap: counted in `lapped`, `out` is then torn and must be ignored).
        """
        with self._lock:
            slot = self._last
            if slot < 0 or self._state[slot] == _WRITING:
                return None
            gen, rec = self._gen[slot], self.meta[slot].copy()
        np.copyto(out, self.slab[slot])
        with self._lock:
            if self._gen[slot] != gen:
                self.lapped += 1
                return None
        return rec

    # --- state ---------------------------------------------------------------------------------------
    def set_release_hook(self, hook: Callable[[int], None] | None) -> None:
        """Call `hook(n_released)` after each release (outside the lock): lets a proxy re-grant credits."""
        self._release_hook = hook

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def exhausted(self) -> bool:
        """Input closed and every frame and marker consumed."""
        with self._lock:
            return self._closed and not self._ready

    def lost_ids(self) -> np.ndarray:
        """Ids of frames lost to drops and overwrites, oldest first (the last `lost_log` of them)."""
        with self._lock:
            return np.array(self._lost, dtype=np.int64)

    def stats(self) -> dict[str, Any]:
        """Counters: received (committed), dropped (no slot), overwritten (latest policy), lapped, taken,
        in_flight (leased), queued (committed, not taken), occupancy (queued + in_flight), high_water."""
        with self._lock:
            return {
                "policy": self.policy, "slots": self.n_slots, "received": self.received, "dropped": self.dropped,
                "overwritten": self.overwritten, "lapped": self.lapped, "taken": self.taken,
                "in_flight": self._n_leased, "queued": self._n_ready,
                "occupancy": self._n_ready + self._n_leased, "high_water": self.high_water,
                "closed": self._closed,
            }

    # --- internals (lock held) -----------------------------------------------------------------------
    def _hand_out(self) -> int:
        slot = self._free.popleft()
        self._state[slot] = _WRITING
        self._gen[slot] += 1
        return slot

    def _wait_free(self, timeout: float | None, stop: threading.Event | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._free and not self._closed and not (stop is not None and stop.is_set()):
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            if stop is not None:  # wake now and then to notice `stop`
                remaining = 0.05 if remaining is None else min(remaining, 0.05)
            self._writer_waiting = True
            self._can_write.wait(remaining)
            self._writer_waiting = False
        if self._closed:
            raise RingClosed("ring input is closed")

    def _reclaim_oldest(self) -> None:
        for i, slot in enumerate(self._ready):
            if slot != _END:
                del self._ready[i]
                self._state[slot] = _FREE
                self._free.append(slot)
                self._n_ready -= 1
                self.overwritten += 1
                self._lost.append(int(self.meta["frame_id"][slot]))
                return

    def _notify_writer(self) -> None:
        if self._writer_waiting:
            self._can_write.notify()

