"""The quality monitor's score: each patch's phase disagreement with its neighbours' patches, times its residual.

A checked frame's score is r · d^SCORE_ALPHA: r its Fourier residual (pipeline.quality), d the RMS phase
difference between its patch and the mosaic its neighbours made. It is computed once the neighbours on
both sides are in the mosaic (DelayedScores), in the serve loop's quality stage and in bench_epie.py.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

# The score the monitor ranks and thresholds: residual × disagreement^SCORE_ALPHA. Either factor alone misses
# errors the other sees: at 10⁴ photons the residual is mostly shot noise on weak-contrast objects (cells),
# while a patch that agrees with its neighbours can still be wrong in the same way they are. 0.75 was chosen
# on seeds 777–778 (0.35, 0.5, 0.75, 1 tried) and checked on 779–780 (docs/BENCHMARKS.md, "Label-free quality
# monitor").
SCORE_ALPHA = 0.75
# a mosaic pixel counts as covered by the other patches at this fraction of one patch's peak weight
COVER_FRACTION = 0.3


def overlap_disagreement(patches: np.ndarray, corners: np.ndarray, weight: np.ndarray, num: np.ndarray,
                         den: np.ndarray, placed: np.ndarray | None = None) -> np.ndarray:
    """(B,) float32 probe-weighted RMS phase difference (rad) between each patch and the mosaic under it.

    patches: (B, M, M) complex (amplitude·e^{iφ}); corners: (B, 2) canvas pixel of each patch's [0, 0];
    weight: (M, M) blending weight; num, den: the mosaic's sums Σw·z and Σw (H, W). placed: (B,) bool,
    True where the patch is already in the sums: its own contribution (aligned by the best global phase, as
    the stitchers align it) is taken out, so that it is compared with its neighbours only. Pixels covered
    by less than COVER_FRACTION of one patch's peak weight are left out; NaN where under a tenth of the
    patch is covered (no neighbour has arrived yet). Each patch's global phase is matched first: the CNN
    does not fix it. The sums may be read while another thread adds to them (a torn read costs accuracy).
    """
    z = np.asarray(patches)
    b, m = len(z), z.shape[-1]
    w = np.asarray(weight, np.float32)
    placed = np.zeros(b, bool) if placed is None else np.asarray(placed, bool)
    thresh = COVER_FRACTION * float(w.max())
    H, W = num.shape
    out = np.full(b, np.nan, np.float32)
    for k in range(b):  # one M×M window per patch; the service checks 1 frame in `quality.every`
        r, c = int(corners[k][0]), int(corners[k][1])
        ra, ca, rb, cb = max(r, 0), max(c, 0), min(r + m, H), min(c + m, W)
        if ra >= rb or ca >= cb:
            continue
        zk = z[k, ra - r:rb - r, ca - c:cb - c]
        wk = w[ra - r:rb - r, ca - c:cb - c]
        wz = wk * zk
        nk, dk = num[ra:rb, ca:cb], den[ra:rb, ca:cb]
        if placed[k]:
            s = complex(np.vdot(wz, nk))  # the patch sits in the sums rotated by the mosaic's phase against it
            nk = nk - wz * np.complex64(s / abs(s) if abs(s) > 0 else 1.0)
            dk = dk - wk
        ok = dk > thresh
        wo = wk * ok
        wsum = float(wo.sum())
        if np.count_nonzero(ok) < 0.1 * m * m or wsum <= 0:
            continue
        # the phase of mosaic·conj(patch) needs no division by Σw (a positive real): num stands in for it
        x = nk * np.conj(zk)
        s = complex(np.vdot(wo, x))  # the patch's best global phase against the mosaic
        if abs(s) > 0:
            x *= np.complex64(s.conjugate() / abs(s))
        dphi = np.arctan2(x.imag, x.real)
        out[k] = np.sqrt(float(np.vdot(wo, dphi * dphi).real) / wsum)
    return out


def combined_score(residual: np.ndarray, disagreement: np.ndarray, alpha: float = SCORE_ALPHA,
                   fill: float | None = None) -> np.ndarray:
    """residual × disagreement^alpha per frame; where the disagreement is unknown (NaN) `fill` stands in
    (the scan's typical disagreement), or the residual alone when there is none yet."""
    r = np.asarray(residual, np.float64)
    d = np.asarray(disagreement, np.float64)
    if alpha == 0:
        return r.astype(np.float32)
    d = np.where(np.isfinite(d), d, np.nan if fill is None else fill)
    with np.errstate(invalid="ignore"):
        score = np.maximum(r, 0) * np.power(np.maximum(d, 1e-6), alpha)
    return np.where(np.isfinite(score), score, r).astype(np.float32)


class DelayedScores:
    """Scores of checked frames, each computed once `delay` more frames of its series are in the mosaic.

    A patch's neighbours arrive both before and after it (a spiral's rings, a raster's next row), so the
    disagreement waits for them: scored at once, against only the earlier ones, it ranked worse (the live
    stage also runs a batch or two ahead of the mosaic). `add` takes checked frames with their index in the
    series; `collect(stitcher, final)` returns the due ones: (keys, residuals, disagreements, scores).
    """

    def __init__(self, delay: int = 128, alpha: float = SCORE_ALPHA):
        if delay < 0 or alpha < 0:
            raise ValueError(f"score delay ({delay}) and alpha ({alpha}) must be >= 0")
        self.delay, self.alpha = int(delay), float(alpha)
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, list]] = []
        self._seen: deque = deque(maxlen=2048)  # the latest disagreements: their median stands in for unknown ones
        self._median: float | None = None

    def __len__(self) -> int:
        return sum(len(p[0]) for p in self._pending)

    def add(self, index: np.ndarray, amplitude: np.ndarray, phase: np.ndarray, positions_px: np.ndarray,
            residual: np.ndarray, keys: list) -> None:
        """Queue checked frames: their index in the series, patches (copied), positions, residuals, keys."""
        if len(index):
            self._pending.append((np.asarray(index), np.array(amplitude, np.float32), np.array(phase, np.float32),
                                  np.array(positions_px, np.float64), np.asarray(residual, np.float64), list(keys)))

    def collect(self, stitcher: Any, final: bool = False) -> tuple[list, np.ndarray, np.ndarray, np.ndarray]:
        """Score the frames whose `delay` successors are placed (all of them when final) against `stitcher`."""
        n_placed = 0 if stitcher is None else stitcher.n_added
        due, keep = [], []
        for p in self._pending:
            (due if final or p[0].max() + self.delay < n_placed else keep).append(p)
        self._pending = keep
        if not due:
            return [], np.zeros(0), np.zeros(0, np.float32), np.zeros(0, np.float32)
        idx, amp, ph, pos, res = (np.concatenate([p[i] for p in due]) for i in range(5))
        keys = [k for p in due for k in p[5]]
        if stitcher is None:
            dis = np.full(len(idx), np.nan, np.float32)
        else:
            dis = stitcher.disagreement(amp, ph, pos, placed=idx < n_placed)
        known = dis[np.isfinite(dis)]
        if known.size:
            self._seen.extend(known.tolist())
            self._median = float(np.median(self._seen))
        return keys, res, dis, combined_score(res, dis, self.alpha, self._median)
