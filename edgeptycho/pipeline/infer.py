"""InferStage: submits formed batches to the backend and forwards each, in order, once it is inferred."""

from __future__ import annotations

import collections
import queue
import threading
import time

from edgeptycho.hw.base import Backend

from .batcher import BatchSlot, Port
from .telemetry import Telemetry

_POLL_S = 0.05


class _Either:
    """is_set() when the stop event is set or the list (of failures) is not empty: Port.get's stop."""

    def __init__(self, stop: threading.Event, failed: list[BaseException]):
        self.stop, self.failed = stop, failed

    def is_set(self) -> bool:
        return bool(self.failed) or self.stop.is_set()


class InferStage:
    """Submits batches to the backend with up to `inflight` outstanding; forwards each when its wait returns.

    A synchronous backend (cpu, one session) computes inside submit(). An asynchronous one gets the next
    batch submitted before the previous one is waited on: where the backend allows waiting from another
    thread (`wait_from_other_thread`: the cpu backend's sessions), a waiter thread completes batches in
    order while this one submits as soon as a batch and a free slot exist; otherwise this thread alternates,
    submitting ahead whenever the next batch is already formed.
    """

    def __init__(self, backend: Backend, inp: Port, out: Port, telemetry: Telemetry, inflight: int = 2,
                 stop: threading.Event | None = None):
        if inflight < 1:
            raise ValueError(f"inflight must be >= 1, got {inflight}")
        self.backend, self.inp, self.out, self.telemetry = backend, inp, out, telemetry
        self.inflight, self.stop = inflight, stop or threading.Event()
        self.busy_s = 0.0  # time with at least one batch inside submit..wait: the backend's share of the wall
        self._submit_s = self._wait_s = 0.0
        self._batches = 0
        self._busy_until = 0.0
        self.in_progress = 0  # batches taken from the port and not yet forwarded
        self._cond = threading.Condition()
        self.split = bool(getattr(backend, "wait_from_other_thread", False)) and inflight > 1

    @property
    def capacity(self) -> int:
        """Batches the backend can usefully hold at once: 1 when submit() computes synchronously (cpu)."""
        if self.split:
            return self.inflight
        if self._batches < 2 or self._wait_s < 0.05 * self._submit_s:
            return 1
        return self.inflight

    def ready(self) -> bool:
        """True when a batch flushed now would start at once: nothing queued, room on the device."""
        return self.inp.empty() and self.in_progress < self.capacity

    def wait_ready(self, timeout: float) -> bool:
        """Block until ready() (woken at once when a batch completes) or `timeout` s; returns ready()."""
        with self._cond:
            return self._cond.wait_for(self.ready, timeout)

    def _taken(self, delta: int) -> None:
        # Wake the batcher only when a flush could now start at once: a needless wake-up, e.g. right after
        # taking a batch, when the backend is about to be busy, competes with the submit for the GIL and a core.
        with self._cond:
            self.in_progress += delta
            if self.ready():
                self._cond.notify_all()

    def _submit(self, slot: BatchSlot) -> None:
        if slot.n:
            t0 = slot.t_submitted = time.perf_counter()
            self.telemetry.stamp("submitted", slot.seq[:slot.n], t0)
            slot.ticket = self.backend.submit(slot.inputs, slot.outputs, n=slot.n)
            self._submit_s += time.perf_counter() - t0
            self._batches += 1

    def _complete(self, slot: BatchSlot) -> None:
        """Wait for `slot` (completions come in submission order) and forward it."""
        if slot.n:
            t0 = time.perf_counter()
            self.backend.wait(slot.ticket)
            slot.t_inferred = time.perf_counter()
            self._wait_s += slot.t_inferred - t0
            # union of the [submitted, inferred] intervals: overlapping batches count once
            self.busy_s += slot.t_inferred - max(slot.t_submitted, self._busy_until)
            self._busy_until = slot.t_inferred
            self.telemetry.stamp("inferred", slot.seq[:slot.n], slot.t_inferred)
        self.out.put(slot)
        self._taken(-1)

    def run(self) -> None:
        if self.split:
            return self._run_split()
        pending: collections.deque[BatchSlot] = collections.deque()
        while True:
            slot = self.inp.get(self.stop)
            if slot is None:
                return
            self._taken(+1)  # the port shrank
            self._submit(slot)
            pending.append(slot)
            while pending and (len(pending) >= self.inflight or self.inp.empty() or pending[-1].closed):
                done = pending.popleft()
                self._complete(done)
                if done.closed:
                    return

    def _run_split(self) -> None:
        submitted: queue.SimpleQueue[BatchSlot | None] = queue.SimpleQueue()
        room = threading.Semaphore(self.inflight)
        failed: list[BaseException] = []

        def waiter() -> None:
            try:
                while (slot := submitted.get()) is not None:
                    self._complete(slot)
                    room.release()
                    if slot.closed:
                        return
            except BaseException as exc:  # noqa: BLE001 - handed to the submitting thread, which raises it
                failed.append(exc)
                room.release()

        thread = threading.Thread(target=waiter, name="pipeline-infer-wait", daemon=True)
        thread.start()
        give_up = _Either(self.stop, failed)  # a failed wait must not sit behind a stream gone quiet
        try:
            while not failed:
                slot = self.inp.get(give_up)
                if slot is None:
                    break
                self._taken(+1)
                while not room.acquire(timeout=_POLL_S) and not give_up.is_set():
                    pass
                if give_up.is_set():  # halted (drop the batch, as the one-thread path does) or failed
                    break
                self._submit(slot)
                submitted.put(slot)
                if slot.closed:
                    thread.join()
                    break
        finally:
            submitted.put(None)
            thread.join(1.0)
        if failed:
            raise failed[0]
