"""Pipeline telemetry: per-frame stage timestamps in preallocated arrays, latency histograms, rates, counters."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np

STAGES = ("received", "batched", "submitted", "inferred", "published")
# Latency intervals reported by status and bench: (name, from stage, to stage).
INTERVALS = (
    ("receive_to_batched", "received", "batched"),
    ("batched_to_inferred", "batched", "inferred"),
    ("inferred_to_published", "inferred", "published"),
    ("receive_to_published", "received", "published"),
)
# Derived: "overhead" = receive→published minus batch formation (received→batched) and inference compute
# (submitted→inferred): the time a frame spends queued for the backend and being postprocessed/published.
# "detector_to_published" when the source knows the detector's own timestamp.
DERIVED = ("overhead", "detector_to_published")


class WallClock:
    """perf_counter for intervals (monotonic, ns resolution) plus the fixed offset that maps it to Unix time."""

    def __init__(self) -> None:
        self.offset = time.time() - time.perf_counter()

    @staticmethod
    def now() -> float:
        return time.perf_counter()

    def to_unix(self, t: float) -> float:
        return t + self.offset


class StageClock:
    """Timestamps (perf_counter s) of every frame at every stage, indexed by sequence number mod capacity.

    One (capacity, n_stages) float64 array allocated up front: stamping a batch is one fancy-index store,
    no per-frame objects. Capacity must exceed the frames in flight (ring slots + batches + queues).
    """

    def __init__(self, capacity: int, stages: Sequence[str] = STAGES):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.stages = tuple(stages)
        self.index = {s: i for i, s in enumerate(self.stages)}
        self.t = np.full((self.capacity, len(self.stages)), np.nan)

    def stamp(self, stage: str, seq: np.ndarray | int, t: float | np.ndarray | None = None) -> float | np.ndarray:
        """Record time `t` (default now; a scalar or one per frame) of `stage` for sequence number(s) `seq`."""
        t = time.perf_counter() if t is None else t
        self.t[np.asarray(seq) % self.capacity, self.index[stage]] = t
        return t

    def interval(self, seq: np.ndarray, start: str, end: str) -> np.ndarray:
        """end − start (s) for each sequence number in `seq`."""
        rows = self.t[np.asarray(seq) % self.capacity]
        return rows[:, self.index[end]] - rows[:, self.index[start]]

    def reset(self, seq: np.ndarray) -> None:
        self.t[np.asarray(seq) % self.capacity] = np.nan


class LatencyHistogram:
    """Log-spaced latency histogram (1 µs … 100 s, ~2.3 % bins); percentiles interpolated within a bin."""

    def __init__(self, lo: float = 1e-6, hi: float = 100.0, bins_per_decade: int = 100):
        self.lo, self.hi = lo, hi
        n = int(round(np.log10(hi / lo) * bins_per_decade))
        self.edges = np.geomspace(lo, hi, n + 1)
        self.counts = np.zeros(n + 2, dtype=np.int64)  # [0] underflow, [-1] overflow
        self.total = 0
        self.sum = 0.0
        self.max = 0.0

    def record(self, values: np.ndarray | float) -> None:
        v = np.atleast_1d(np.asarray(values, dtype=np.float64))
        v = v[np.isfinite(v)]
        if v.size == 0:
            return
        idx = np.searchsorted(self.edges, v, side="right")
        self.add(np.bincount(idx, minlength=len(self.counts))[: len(self.counts)], int(v.size), float(v.sum()),
                 float(v.max()))

    def add(self, counts: np.ndarray, total: int, total_sum: float, vmax: float) -> None:
        """Add pre-binned values (counts per bin of this histogram's edges, underflow/overflow included)."""
        self.counts += counts
        self.total += total
        self.sum += total_sum
        self.max = max(self.max, vmax)

    def percentile(self, q: float) -> float | None:
        """q in [0, 100]; None when empty."""
        if self.total == 0:
            return None
        rank = q / 100.0 * self.total
        cum = np.cumsum(self.counts)
        b = int(np.searchsorted(cum, max(rank, 1e-12), side="left"))
        if b == 0:
            return self.lo
        if b >= len(self.counts) - 1:
            return self.max
        lo, hi = self.edges[b - 1], self.edges[b]
        before = cum[b - 1] if b > 0 else 0
        frac = (rank - before) / max(self.counts[b], 1)
        return float(min(lo * (hi / lo) ** min(max(frac, 0.0), 1.0), self.max))

    def mean(self) -> float | None:
        return self.sum / self.total if self.total else None

    def summary(self, scale: float = 1e3) -> dict[str, float | int | None]:
        """count, p50, p99, max, mean in milliseconds (scale 1e3)."""
        def s(x: float | None) -> float | None:
            return None if x is None else round(x * scale, 4)
        return {"count": self.total, "p50": s(self.percentile(50)), "p99": s(self.percentile(99)),
                "max": s(self.max if self.total else None), "mean": s(self.mean())}

    def merge(self, other: LatencyHistogram) -> None:
        self.counts += other.counts
        self.total += other.total
        self.sum += other.sum
        self.max = max(self.max, other.max)

    def reset(self) -> None:
        self.counts[:] = 0
        self.total, self.sum, self.max = 0, 0.0, 0.0


class RateMeter:
    """Events per second since the previous `rate()` call and since the start."""

    def __init__(self) -> None:
        self.count = 0
        self.t0 = time.perf_counter()
        self._last_t, self._last_count = self.t0, 0

    def add(self, n: int = 1) -> None:
        self.count += n

    def rate(self) -> float:
        now = time.perf_counter()
        dt = now - self._last_t
        r = (self.count - self._last_count) / dt if dt > 0 else 0.0
        self._last_t, self._last_count = now, self.count
        return r

    def overall(self) -> float:
        dt = time.perf_counter() - self.t0
        return self.count / dt if dt > 0 else 0.0


class Telemetry:
    """Everything the status message and the bench report: stage clock, histograms, rates and counters."""

    def __init__(self, capacity: int):
        self.clock = StageClock(capacity)
        self.wall = WallClock()
        names = [name for name, _, _ in INTERVALS] + list(DERIVED)
        self._hist = {name: LatencyHistogram() for name in names}
        self._recent = {name: LatencyHistogram() for name in names}
        self.rates = {s: RateMeter() for s in STAGES}
        self.counters: dict[str, int] = {}
        self._lock = threading.Lock()
        self.t_first: float | None = None
        self.t_last: float | None = None
        # Published batches whose latencies are not yet binned: binning is done when a summary is read
        # (status at 1 Hz, the report), off the post thread, where it had cost ~160 µs per batch under load.
        self._pending: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._pending_n = 0

    @property
    def hist(self) -> dict[str, LatencyHistogram]:
        """Latency histograms of the whole run (every published frame so far)."""
        self._drain()
        return self._hist

    @property
    def recent(self) -> dict[str, LatencyHistogram]:
        """Latency histograms since the last status()."""
        self._drain()
        return self._recent

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] = self.counters.get(name, 0) + n

    def stamp(self, stage: str, seq: np.ndarray | int, t: float | np.ndarray | None = None) -> float | np.ndarray:
        """Stamp `stage` for frames `seq` at `t` (default now; scalar or per frame) and count them."""
        t = self.clock.stamp(stage, seq, t)
        self.rates[stage].add(int(np.size(seq)))
        if stage == "received" and self.t_first is None and np.size(t):
            self.t_first = float(np.min(t))
        return t

    def received(self, seq: np.ndarray, t_unix: np.ndarray) -> None:
        """Stamp arrival from the ring's commit times (Unix s), mapped onto the perf_counter clock."""
        self.stamp("received", seq, np.asarray(t_unix, dtype=np.float64) - self.wall.offset)

    def published(self, seq: np.ndarray, t: float | None = None, t_detector: np.ndarray | None = None) -> float:
        """Stamp a batch as published and record its latencies in every histogram.

        `t_detector` (Unix s, NaN where unknown) gives detector→published for sources that stamp frames.
        """
        t = float(self.stamp("published", seq, t))
        self.t_last = t
        seq = np.array(seq, dtype=np.int64, copy=True)  # the caller's arrays are recycled with the batch
        t_det = None if t_detector is None else np.array(t_detector, dtype=np.float64, copy=True)
        with self._lock:
            self._pending.append((seq, t_det))
            self._pending_n += len(seq)
            due = self._pending_n > self.clock.capacity // 4  # bin before the stage clock's rows are reused
        if due:
            self._drain()
        return t

    def _drain(self) -> None:
        """Bin the latencies of every batch published since the last call into both histogram sets."""
        with self._lock:  # held only to take the batches and, below, to add the counts: not for the binning
            pending, self._pending, self._pending_n = self._pending, [], 0
        if pending:
            self._bin(pending)

    def _bin(self, pending: list[tuple[np.ndarray, np.ndarray | None]]) -> None:
        c = self.clock
        seq = np.concatenate([p[0] for p in pending])
        rows = c.t[seq % c.capacity]
        lat = {name: rows[:, c.index[b]] - rows[:, c.index[a]] for name, a, b in INTERVALS}
        lat["overhead"] = (lat["receive_to_published"] - lat["receive_to_batched"]
                           - (rows[:, c.index["inferred"]] - rows[:, c.index["submitted"]]))
        if any(p[1] is not None for p in pending):
            t_det = np.concatenate([p[1] if p[1] is not None else np.full(len(p[0]), np.nan) for p in pending])
            lat["detector_to_published"] = self.wall.to_unix(rows[:, c.index["published"]]) - t_det
        # every interval binned at once (one searchsorted, one bincount)
        names = list(lat)
        vals = np.stack([lat[k] for k in names])
        ok = np.isfinite(vals)
        h0 = self._hist[names[0]]
        nb = len(h0.counts)
        idx = np.searchsorted(h0.edges, vals, side="right") + nb * np.arange(len(names))[:, None]
        counts = np.bincount(idx[ok], minlength=nb * len(names)).reshape(len(names), nb)
        totals = ok.sum(axis=1).tolist()
        sums = np.where(ok, vals, 0.0).sum(axis=1).tolist()
        maxes = np.where(ok, vals, -np.inf).max(axis=1).tolist()
        with self._lock:
            for k, name in enumerate(names):
                if totals[k]:
                    for h in (self._hist[name], self._recent[name]):
                        h.add(counts[k], totals[k], sums[k], maxes[k])

    def status(self, reset_recent: bool = True, **extra: object) -> dict[str, object]:
        """A JSON-ready snapshot: rates (Hz, recent and overall), latency ms (recent and overall), counters."""
        self._drain()
        with self._lock:
            out: dict[str, object] = {
                "rates_hz": {s: round(m.rate(), 2) for s, m in self.rates.items()},
                "rates_overall_hz": {s: round(m.overall(), 2) for s, m in self.rates.items()},
                "latency_ms": {k: h.summary() for k, h in self._hist.items()},
                "latency_recent_ms": {k: h.summary() for k, h in self._recent.items()},
                "counters": dict(self.counters),
            }
            if reset_recent:
                for h in self._recent.values():
                    h.reset()
        out.update(extra)
        return out

    def throughput(self) -> float:
        """Frames published per second between the first receive and the last publish."""
        n = self.rates["published"].count
        if self.t_first is None or self.t_last is None or self.t_last <= self.t_first:
            return 0.0
        return n / (self.t_last - self.t_first)
