"""Streaming mosaic for the serve loop: patches blended in scan order, ramp removed, live uncertainty, pastes."""

from __future__ import annotations

import math
import threading

import numpy as np

from .score import overlap_disagreement
from .stitcher import (
    MIN_WEIGHT_FRACTION,
    StitchResult,
    _check_patches,
    patch_corners,
    ramp_from_pairs,
    weighted_complex,
)
from .uncertainty import phase_sigma

# The phase ramp is re-estimated at snapshot time once the patch count grew by this factor (so its cost,
# a k-d tree over the positions, stays O(N log N) in all), and applied only when it moves the phase by
# more than RAMP_TOL_RAD somewhere on the canvas (applying it re-renders the whole mosaic once).
RAMP_RECHECK = 1.25
RAMP_TOL_RAD = 0.05


class LiveStitcher:
    """Streaming mosaic: add_batch aligns each new patch's phase offset to the mosaic and blends it in.

    Adds run in one thread (the pipeline's stitch stage); snapshot() may be called from another thread at
    10–30 Hz. Snapshot reads the accumulators without the add lock: a display frame may show one patch
    half-added, never a corrupt pixel, and the adds are never blocked by a display. paste() (the refinement
    thread) and add_batch() share one lock, since both read-modify-write the sums. Only the region changed since the
    previous snapshot is recomputed. Beside Σw·z (num) and Σw (den) it keeps Σw·|z|² (sq) and, for the
    patches that come with a residual, Σw·r and Σw: the uncertainty's inputs (pipeline.uncertainty),
    refreshed with the mosaic; R is relative to the median of the residuals added so far.
    remove_ramp (off by default, as in stitch()): the rendered mosaic has the global phase ramp removed
    (stitcher.phase_ramp), measured at snapshot time from the patches' offsets: the greedy alignment makes
    o_j − o_i ≈ arg H_ij, so the offset differences of overlapping pairs against their displacement give the
    same fit without the overlap matrix. The sums stay ramp-free; only the rendering multiplies it out.
    """

    def __init__(self, canvas_shape: tuple[int, int], m: int, weight: np.ndarray,
                 origin_px: tuple[int, int] = (0, 0), remove_ramp: bool = False):
        self.shape = (int(canvas_shape[0]), int(canvas_shape[1]))
        self.origin_px = (int(origin_px[0]), int(origin_px[1]))  # object pixel of canvas pixel (0, 0)
        if min(self.shape) < 1:
            raise ValueError(f"canvas_shape must be positive, got {canvas_shape}")
        self.m = int(m)
        if np.shape(weight) != (self.m, self.m):
            raise ValueError(f"weight must be ({m}, {m}), got shape {np.shape(weight)}")
        self.weight = np.asarray(weight, dtype=np.float32)
        self._num = np.zeros(self.shape, dtype=np.complex64)
        self._den = np.zeros(self.shape, dtype=np.float32)
        self._sq = np.zeros(self.shape, dtype=np.float32)
        self._rnum = np.zeros(self.shape, dtype=np.float32)  # Σ w·r over patches with a residual
        self._rden = np.zeros(self.shape, dtype=np.float32)  # Σ w over those patches
        self._resid: list[float] = []  # every residual added, for the running median
        self._resid_ref: tuple[int, float | None] = (0, None)  # (count, median) cached between refreshes
        self._sigma = np.full(self.shape, np.nan, dtype=np.float32)
        self._mosaic = np.zeros(self.shape, dtype=np.complex64)
        self._amp = np.zeros(self.shape, dtype=np.float32)
        self._phase = np.zeros(self.shape, dtype=np.float32)
        self._thresh = MIN_WEIGHT_FRACTION * float(self.weight.max())
        self._dirty = [self.shape[0], self.shape[1], 0, 0]  # r0, c0, r1, c1 since the last snapshot
        self._dirty_lock = threading.Lock()
        self._snap_lock = threading.Lock()  # serialises snapshot callers (monitor, final writer), never adds
        self._sums_lock = threading.Lock()  # add_batch vs paste: both read-modify-write the sums
        self.offsets: list[float] = []
        self._positions: list[np.ndarray] = []  # canvas positions per batch, for the ramp's pairs
        self.remove_ramp = remove_ramp
        self.ramp = (0.0, 0.0)  # rad per pixel (row, col) removed from the rendered mosaic
        self._ramp_n = 0  # patch count at the last estimate
        self._er = np.ones(self.shape[0], np.complex64)  # e^{-i·ramp_r·(r − H/2)}, e^{-i·ramp_c·(c − W/2)}
        self._ec = np.ones(self.shape[1], np.complex64)
        self.n_added = 0

    def add_batch(self, amplitude: np.ndarray, phase: np.ndarray, positions_px: np.ndarray,
                  residual: np.ndarray | None = None) -> np.ndarray:
        """Blend a batch of patches in scan order; returns the phase offsets removed (n,) rad.

        `residual`: (n,) data-consistency residual per patch, NaN where the frame was not checked.
        """
        amplitude, phase, _ = _check_patches(amplitude, phase, positions_px, self.weight)
        n, m = amplitude.shape[0], self.m
        if n == 0:
            return np.zeros(0)
        rk = np.full(n, np.nan) if residual is None else np.asarray(residual, np.float64).ravel()
        if rk.shape != (n,):
            raise ValueError(f"residual must be ({n},) like the patches, got shape {rk.shape}")
        known = np.isfinite(rk)
        u = weighted_complex(amplitude, phase, self.weight)
        wz2 = amplitude * amplitude  # w·|z|², batched before the per-patch loop
        wz2 *= self.weight
        corners = patch_corners(positions_px, m) - np.asarray(self.origin_px)
        offsets = np.zeros(n)
        H, W = self.shape
        r0b, c0b, r1b, c1b = H, W, 0, 0
        with self._sums_lock:  # once per batch: a paste waits at most one batch's blending
            for k in range(n):  # one patch at a time: each aligns to the mosaic its predecessors made
                r0b, c0b, r1b, c1b = self._blend(k, corners[k], u, wz2, rk[k], known[k], offsets,
                                                 (r0b, c0b, r1b, c1b))
        with self._dirty_lock:
            d = self._dirty
            self._dirty = [min(d[0], r0b), min(d[1], c0b), max(d[2], r1b), max(d[3], c1b)]
        self._positions.append(np.asarray(positions_px, np.float64) - np.asarray(self.origin_px))
        self.offsets.extend(offsets.tolist())
        self._resid.extend(rk[known].tolist())
        self.n_added += n
        return offsets

    def _blend(self, k: int, corner: np.ndarray, u: np.ndarray, wz2: np.ndarray, rk: float, known: bool,
               offsets: np.ndarray, box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        """Blend patch k (phase-aligned to the mosaic) into the sums; returns the changed box grown by it."""
        m, (H, W) = self.m, self.shape
        r, c = int(corner[0]), int(corner[1])
        ra, ca, rb, cb = max(r, 0), max(c, 0), min(r + m, H), min(c + m, W)
        if ra >= rb or ca >= cb:
            return box  # wholly off the canvas
        patch = u[k, ra - r:rb - r, ca - c:cb - c]
        num = self._num[ra:rb, ca:cb]
        s = complex(np.vdot(num, patch))  # Σ conj(mosaic)·patch: the patch's phase relative to the mosaic
        a = abs(s)
        if a > 0:
            offsets[k] = math.atan2(s.imag, s.real)
            num += patch * np.complex64(s.conjugate() / a)
        else:
            num += patch
        wk = self.weight[ra - r:rb - r, ca - c:cb - c]
        self._den[ra:rb, ca:cb] += wk
        self._sq[ra:rb, ca:cb] += wz2[k, ra - r:rb - r, ca - c:cb - c]
        if known:
            self._rnum[ra:rb, ca:cb] += np.float32(rk) * wk
            self._rden[ra:rb, ca:cb] += wk
        return min(box[0], ra), min(box[1], ca), max(box[2], rb), max(box[3], cb)

    def _refresh(self) -> None:
        """Recompute the mosaic (and its amplitude and phase) where patches landed since the last call."""
        new_ramp = self.remove_ramp and self._update_ramp()
        with self._dirty_lock:
            r0, c0, r1, c1 = (0, 0, *self.shape) if new_ramp else self._dirty
            self._dirty = [self.shape[0], self.shape[1], 0, 0]
        if r1 > r0 and c1 > c0:
            # Views, not copies: adds go on meanwhile either way, so a display frame may show a patch half
            # added (a copy of num then den tears the same way); the next refresh has it whole.
            num, den = self._num[r0:r1, c0:c1], self._den[r0:r1, c0:c1]
            inv = np.zeros(den.shape, np.float32)
            np.divide(1.0, den, out=inv, where=den > self._thresh)
            region = num.copy()  # contiguous: its float32 view is a view
            region.view(np.float32).reshape(*region.shape, 2)[...] *= inv[..., None]  # real × complex, no casts
            if self.ramp != (0.0, 0.0):
                region *= self._er[r0:r1, None]
                region *= self._ec[None, c0:c1]
            self._mosaic[r0:r1, c0:c1] = region
            np.abs(region, out=self._amp[r0:r1, c0:c1])
            np.arctan2(region.imag, region.real, out=self._phase[r0:r1, c0:c1])
            self._sigma[r0:r1, c0:c1] = phase_sigma(num, den, self._sq[r0:r1, c0:c1], float(self.weight.max()),
                                                    self._rnum[r0:r1, c0:c1], self._rden[r0:r1, c0:c1],
                                                    self._resid_median())

    def _resid_median(self) -> float | None:
        """Median of the residuals added so far (None before any), recomputed only when more arrived."""
        k = len(self._resid)
        if k and k != self._resid_ref[0]:
            self._resid_ref = (k, float(np.median(np.asarray(self._resid[:k]))))
        return self._resid_ref[1]

    def _update_ramp(self) -> bool:
        """Re-estimate the phase ramp when enough patches arrived; True when the rendering must change."""
        n = self.n_added
        if n < 8 or n < RAMP_RECHECK * self._ramp_n:
            return False
        from scipy.spatial import cKDTree

        self._ramp_n = n
        pos = np.concatenate(self._positions)[:n]  # the adding thread appends positions before n_added
        off = np.asarray(self.offsets[:n])
        pairs = cKDTree(pos).query_pairs(self.m, output_type="ndarray")  # every overlapping pair, as H has
        if len(pairs) < 3:
            return False
        i, j = pairs[:, 0], pairs[:, 1]
        dpos = pos[j] - pos[i]
        conf = 1.0 - np.hypot(dpos[:, 0], dpos[:, 1]) / self.m  # overlap (|H_ij|) falls with the distance
        ramp = ramp_from_pairs(dpos, np.angle(np.exp(1j * (off[j] - off[i]))), conf)
        H, W = self.shape
        if abs(ramp[0] - self.ramp[0]) * H + abs(ramp[1] - self.ramp[1]) * W < RAMP_TOL_RAD:
            return False
        self.ramp = ramp
        self._er = np.exp(-1j * ramp[0] * (np.arange(H) - H / 2)).astype(np.complex64)
        self._ec = np.exp(-1j * ramp[1] * (np.arange(W) - W / 2)).astype(np.complex64)
        return True

    def paste(self, box: tuple[int, int, int, int], values: np.ndarray) -> None:
        """Replace the mosaic in canvas box (r0, r1, c0, c1) by `values` (a refined region), phase-matched.

        The sums are rescaled so that later patches keep blending in with their usual weight; the spread
        (uncertainty) of the box is kept, since refinement gives no per-pixel spread of its own. Called from
        the refinement thread; it waits while a batch is being blended, so no patch's contribution is lost.
        """
        r0, r1, c0, c1 = (int(v) for v in box)
        values = np.asarray(values, np.complex64)
        if values.shape != (r1 - r0, c1 - c0):
            raise ValueError(f"values {values.shape} do not fit box {box}")
        if self.ramp != (0.0, 0.0):  # values come from the rendered (ramp-removed) mosaic; the sums have it
            values = values * np.conj(self._er[r0:r1, None] * self._ec[None, c0:c1])
        num, den, sq = self._num[r0:r1, c0:c1], self._den[r0:r1, c0:c1], self._sq[r0:r1, c0:c1]
        with self._sums_lock:
            dot = complex(np.vdot(values, num))  # the mosaic's phase gauge, as solve_sub keeps the seed's
            if abs(dot) > 0:
                values = values * np.complex64(dot / abs(dot))
            good = den > self._thresh
            d = den[good]
            mean2 = np.abs(num[good]) ** 2 / (d * d)
            rel = np.maximum(sq[good] / d - mean2, 0) / np.maximum(mean2, 1e-12)  # σ² kept: spread / |mean|²
            v = values[good]
            num[good] = v * d
            sq[good] = np.abs(v) ** 2 * (1 + rel) * d
        with self._dirty_lock:
            d = self._dirty
            self._dirty = [min(d[0], r0), min(d[1], c0), max(d[2], r1), max(d[3], c1)]

    def disagreement(self, amplitude: np.ndarray, phase: np.ndarray, positions_px: np.ndarray,
                     placed: np.ndarray | None = None) -> np.ndarray:
        """(n,) RMS phase difference (rad) of patches against the mosaic their neighbours made so far
        (score.overlap_disagreement); `placed`: which of them were already added (then left out).
        Reads the sums without the add lock, from any thread, as snapshot does."""
        amplitude, phase, _ = _check_patches(amplitude, phase, positions_px, self.weight)
        corners = patch_corners(positions_px, self.m) - np.asarray(self.origin_px)
        return overlap_disagreement(weighted_complex(amplitude, phase), corners, self.weight, self._num,
                                    self._den, placed)

    def snapshot_sigma(self) -> np.ndarray:
        """The live phase uncertainty σ (H, W) float32 rad (NaN where nothing landed); a new array."""
        with self._snap_lock:
            self._refresh()
            return self._sigma.copy()

    def snapshot(self) -> np.ndarray:
        """The current mosaic (H, W) complex64 (zero where nothing landed yet); a new array each call."""
        with self._snap_lock:
            self._refresh()
            return self._mosaic.copy()

    def snapshot_amp_phase(self, copy: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Amplitude and phase (H, W) float32 of the mosaic, kept up to date region by region.

        copy=False returns the internal arrays (no full-canvas work at all): for one consumer, such as the
        monitor that hands them straight to ZeroMQ (which copies), and only until its next call.
        """
        with self._snap_lock:
            self._refresh()
            return (self._amp.copy(), self._phase.copy()) if copy else (self._amp, self._phase)

    def weight_map(self) -> np.ndarray:
        """Summed blending weight (H, W) so far."""
        return self._den.copy()

    def result(self) -> StitchResult:
        """The mosaic so far as a StitchResult (offsets in arrival order)."""
        obj = self.snapshot()
        return StitchResult(obj, self.weight_map(), np.asarray(self.offsets), self.origin_px, self.ramp,
                            uncertainty=self.snapshot_sigma())
