"""Range observers for int8 calibration (min-max, percentile, entropy/KL, MSE-optimal) behind one interface.

Every observer sees a stream of activation batches (`update`) and answers two questions:
- `amax()`: the clipping threshold of a linear symmetric int8 scale (scale = amax / 127; trt-int8);
- `fix_point()`: the power-of-two scale 2**-fix_point (dpu-pow2). Min-max and percentile take the
  non-overflow fix_point of their amax; entropy and MSE compare the pow2 candidates themselves (the DPU
  quantizer's "min-MSE" method searches the same candidates).

All but min-max work on one histogram of |x| (symmetric quantization only needs magnitudes) whose top is a
power of two that doubles, by merging bin pairs, when data exceed it: a single pass, exact merges, and
pow2 thresholds fall on bin edges.
"""

from __future__ import annotations

import abc
import math
from typing import ClassVar

import numpy as np

from .qdq import pow2_fix_point, quantize_pow2_weights

OBSERVERS = ("minmax", "percentile", "entropy", "mse")
BINS = 2048
POW2_CANDIDATES = 5  # fix_points tried above the non-overflow one (each halves the range)


class AbsHistogram:
    """Counts of |x| in `bins` equal bins on [0, top]; top is a power of two that grows by doubling."""

    def __init__(self, bins: int = BINS):
        if bins < 256 or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two >= 256, got {bins}")
        self.counts = np.zeros(bins, np.int64)
        self.top = 0.0
        self.amax = 0.0

    @property
    def width(self) -> float:
        return self.top / len(self.counts)

    def update(self, x: np.ndarray) -> None:
        a = np.abs(np.asarray(x, dtype=np.float32).reshape(-1))
        if a.size == 0:
            return
        m = float(a.max())
        if not math.isfinite(m):
            raise ValueError("calibration activations contain inf/NaN")
        self.amax = max(self.amax, m)
        if m == 0.0 and self.top == 0.0:
            self.counts[0] += a.size
            return
        if self.top == 0.0:
            self.top = 2.0 ** math.ceil(math.log2(m))
        while m > self.top:  # merge neighbouring bins: the histogram of the same data on [0, 2·top]
            half = self.counts.reshape(-1, 2).sum(axis=1)
            self.counts[:] = 0
            self.counts[: len(half)] = half
            self.top *= 2.0
        idx = np.minimum((a * np.float32(len(self.counts) / self.top)).astype(np.int64), len(self.counts) - 1)
        self.counts += np.bincount(idx, minlength=len(self.counts))

    def centres(self) -> np.ndarray:
        return (np.arange(len(self.counts)) + 0.5) * self.width


class Observer(abc.ABC):
    """Watches one tensor over the calibration set; `amax()` for linear scales, `fix_point()` for pow2 scales."""

    name: ClassVar[str] = "abstract"

    def __init__(self, bins: int = BINS):
        self.hist = AbsHistogram(bins)

    def update(self, x: np.ndarray) -> None:
        self.hist.update(x)

    @abc.abstractmethod
    def amax(self) -> float:
        """Clipping threshold (> 0) for a symmetric int8 scale amax / 127."""

    def fix_point(self) -> int:
        """Power-of-two scale 2**-fix_point; default: the non-overflow fix_point of amax()."""
        return pow2_fix_point(self.amax())

    def _require_data(self) -> None:
        if self.hist.counts.sum() == 0:
            raise ValueError(f"{self.name} observer has seen no data")

    def _pow2_candidates(self) -> list[int]:
        fp0 = pow2_fix_point(self.hist.amax)
        return list(range(fp0, fp0 + POW2_CANDIDATES))


class MinMaxObserver(Observer):
    """The largest |x| seen: never clips, wastes range on outliers."""

    name = "minmax"

    def amax(self) -> float:
        self._require_data()
        return max(self.hist.amax, 2.0**-24)


class PercentileObserver(Observer):
    """The `percentile` of |x| (default 99.99 %): clips the rarest outliers."""

    name = "percentile"

    def __init__(self, percentile: float = 99.99, bins: int = BINS):
        super().__init__(bins)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def amax(self) -> float:
        self._require_data()
        cdf = np.cumsum(self.hist.counts) / self.hist.counts.sum()
        i = int(np.searchsorted(cdf, self.percentile / 100.0))
        return max(min((i + 1) * self.hist.width, self.hist.amax), 2.0**-24)


class MSEObserver(Observer):
    """The threshold minimising the expected squared quantization error (rounding + clipping) of the histogram."""

    name = "mse"

    def mse(self, threshold: float) -> float:
        """Expected squared error per sample with scale threshold / 127, bin contents at their centres."""
        h = self.hist
        c, n = h.centres(), h.counts
        s = threshold / 127.0
        clipped = c > threshold
        if s >= h.width:  # steps coarser than bins: round each bin centre
            err = (c - np.minimum(np.floor(c / s + 0.5), 127.0) * s) ** 2
        else:  # steps finer than bins: uniform rounding error inside each bin
            err = np.full_like(c, s * s / 12.0)
        err = np.where(clipped, (c - threshold) ** 2, err)
        return float(np.dot(n, err) / max(n.sum(), 1))

    def amax(self) -> float:
        self._require_data()
        top = self.hist.amax
        candidates = top * np.linspace(0.05, 1.0, 96)
        errs = [self.mse(t) for t in candidates]
        return max(float(candidates[int(np.argmin(errs))]), 2.0**-24)

    def fix_point(self) -> int:
        self._require_data()
        cands = self._pow2_candidates()
        return cands[int(np.argmin([self.mse(127.0 * 2.0**-fp) for fp in cands]))]


class EntropyObserver(Observer):
    """TensorRT-style calibration: the threshold minimising KL(P‖Q) between the clipped histogram P and its
    128-level quantised version Q (the zero spike of ReLU outputs is flattened, as TensorRT does)."""

    name = "entropy"
    LEVELS = 128

    def kl(self, i: int) -> float:
        """KL divergence when clipping at the edge of bin i (128 <= i <= bins)."""
        bins = self.hist.counts.astype(np.float64)
        bins[0] = bins[1] if len(bins) > 1 else bins[0]
        p = bins[:i].copy()
        p[-1] += bins[i:].sum()
        level = (np.arange(i) * self.LEVELS) // i
        nonzero = bins[:i] > 0
        mass = np.bincount(level, weights=bins[:i], minlength=self.LEVELS)
        count = np.bincount(level, weights=nonzero.astype(np.float64), minlength=self.LEVELS)
        q = np.where(nonzero, mass[level] / np.maximum(count[level], 1.0), 0.0)
        if p.sum() <= 0 or q.sum() <= 0:
            return math.inf
        p /= p.sum()
        q /= q.sum()
        m = p > 0
        with np.errstate(divide="ignore"):
            return float(np.sum(p[m] * np.log(p[m] / np.where(q[m] > 0, q[m], 1e-12))))

    def amax(self) -> float:
        self._require_data()
        nb = len(self.hist.counts)
        last = min(nb, int(math.ceil(self.hist.amax / self.hist.width)))
        if last <= self.LEVELS:  # every value already within 128 bins: nothing to clip
            return max(self.hist.amax, 2.0**-24)
        cands = list(range(self.LEVELS, last + 1, max(1, (last - self.LEVELS) // 256)))
        i = cands[int(np.argmin([self.kl(i) for i in cands]))]
        return min(i * self.hist.width, self.hist.amax)

    def fix_point(self) -> int:
        self._require_data()
        nb, width = len(self.hist.counts), self.hist.width
        cands, bins = [], []
        for fp in self._pow2_candidates():
            i = min(nb, int(round(128.0 * 2.0**-fp / width)))
            if i >= self.LEVELS:
                cands.append(fp)
                bins.append(i)
        if not cands:
            return pow2_fix_point(self.hist.amax)
        return cands[int(np.argmin([self.kl(i) for i in bins]))]


def make_observer(name: str, **kwargs: float) -> Observer:
    """A fresh observer by name (minmax, percentile, entropy, mse)."""
    classes = {c.name: c for c in (MinMaxObserver, PercentileObserver, EntropyObserver, MSEObserver)}
    if name not in classes:
        raise ValueError(f"unknown observer '{name}'; known: {', '.join(OBSERVERS)}")
    return classes[name](**kwargs)


def weight_fix_point(w: np.ndarray, method: str = "mse") -> int:
    """pow2 fix_point of a weight/bias tensor, computed on the exact values (STD_ROUND, as the DPU quantizer).

    "minmax": non-overflow; "mse": the candidate (non-overflow and up to 4 finer) with least squared error.
    """
    w = np.asarray(w, dtype=np.float32)
    fp0 = pow2_fix_point(float(np.abs(w).max(initial=0.0)))
    if method == "minmax" or w.size == 0:
        return fp0
    if method != "mse":
        raise ValueError(f"weight method must be 'minmax' or 'mse', got {method!r}")
    errs = []
    for fp in range(fp0, fp0 + POW2_CANDIDATES):
        q = quantize_pow2_weights(w, fp).astype(np.float32) * np.float32(2.0**-fp)
        errs.append(float(np.sum((q - w) ** 2)))
    return fp0 + int(np.argmin(errs))
