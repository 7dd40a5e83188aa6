"""Label-free quality monitor: per-frame data-consistency residual of CNN patches, fallback flags, references.

The CNN predicts the central M×M object patch under the probe. Multiplying it by the known probe (cropped to
the same M×M) and propagating gives the far field on a coarser reciprocal grid: an M-sample window has
frequency spacing 1/(M·dx), i.e. n/M full-frame detector pixels, so the model is compared with the measured
pattern binned by n/G on a G×G grid (G = the window by default; a larger `grid` zero-pads the exit wave,
G = n is the full-resolution comparison). The residual is the normalised Fourier misfit of physics.epie,

    r = Σ (√I_model − √I_meas)² / Σ I_meas     (per frame, over valid binned pixels),

minus the expected Poisson part of it, so it is about zero for a perfect patch and grows with the patch
error. The patch is first padded (edge values) to a 2M window so that the probe's tails are not cut: the
cut tails, lit on an object the patch does not show, were the main frame-to-frame error of the residual.

What the monitor ranks and thresholds is the score r · d^α (score.SCORE_ALPHA), d the patch's RMS phase disagreement with the
mosaic of its neighbours' patches, computed once they have arrived (pipeline.score): at low dose the
residual is mostly shot noise, and a patch can agree with neighbours that share its error.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import scipy.fft as sfft

from ..physics.forward import bin_frames, binning_ramp
from ..physics.metrics import complex_nrmse, phase_nrmse


def _poisson_floor_table() -> tuple[np.ndarray, np.ndarray]:
    """E[(√X − √λ)²] for X ~ Poisson(λ), on a log grid of λ (→ λ for small λ, 1/4 for large λ)."""
    from scipy.stats import poisson
    lam = np.logspace(-4, 3, 281)
    k = np.arange(0, 1400)[:, None]
    e_sqrt = (np.sqrt(k) * poisson.pmf(k, lam[None])).sum(0)
    return np.log(lam), 2.0 * lam - 2.0 * np.sqrt(lam) * e_sqrt


_FLOOR_LOGLAM, _FLOOR = _poisson_floor_table()


def poisson_floor(lam: np.ndarray) -> np.ndarray:
    """Expected squared amplitude error E[(√X − √λ)²] of Poisson counts of mean λ (same shape, float32)."""
    lam = np.asarray(lam, np.float32)
    out = np.interp(np.log(np.maximum(lam, 1e-4)), _FLOOR_LOGLAM, _FLOOR).astype(np.float32)
    return np.where(lam < 1e-4, lam, out)


class ForwardResidual:
    """Batched residual of (amplitude, phase) patches against measured frames, for one probe and geometry."""

    def __init__(self, probe: np.ndarray, patch_size: int, grid: int | str | None = "auto",
                 mask: np.ndarray | None = None, workers: int = 1, poisson: bool = True,
                 extend: int | None = None, pad_mode: str = "edge", min_counts: float = 1.0, prebinned: int = 1):
        p = np.asarray(probe)
        p = p[None] if p.ndim == 2 else p
        if p.ndim != 3 or p.shape[-1] != p.shape[-2]:
            raise ValueError(f"probe must be (n, n) or (K, n, n), got shape {p.shape}")
        n, m = p.shape[-1], int(patch_size)
        # `grid`: an int, None (= the window) or "auto" (chosen from the first batch's mean counts).
        # the patch is padded to e×e (pad_mode, default 2M) so that the probe is not cut at the patch edge:
        # the cut tails were the main, frame-dependent error of a perfect patch (floor 0.02 → 0.0005)
        e = int(extend or min(2 * m, n))
        if not m <= e <= n or (e - m) % 2:
            raise ValueError(f"extend {e} must lie in [patch_size {m}, frame {n}] and differ from it by an even count")
        self.pad_by, self.pad_mode = (e - m) // 2, pad_mode
        if not 0 < m <= n:
            raise ValueError(f"patch_size {m} must be in [1, {n}] (the probe window)")
        self.n, self.m, self.e = n, m, e
        self.poisson = poisson
        o = n // 2 - e // 2  # patch index m//2 sits on window index n//2 (the scan position)
        self.probe = np.ascontiguousarray(p[:, o:o + e, o:o + e], dtype=np.complex64)  # (K, e, e)
        self.workers = workers
        self.min_counts = min_counts
        if int(prebinned) < 1:
            raise ValueError(f"prebinned must be >= 1 (detector pixels per frame pixel), got {prebinned}")
        self.prebinned = int(prebinned)  # the frames passed in were binned this much from the detector already
        if mask is not None and mask.shape != (n, n):
            raise ValueError(f"mask must be ({n}, {n}) like a frame, got {mask.shape}")
        self.mask = mask
        self.g = None
        if grid != "auto":
            self._set_grid(int(grid or e))

    def _set_grid(self, g: int) -> None:
        n, e = self.n, self.e
        if n % g or (g < e and e % g):
            raise ValueError(f"grid {g} must divide the frame size {n} and, below the window {e}, divide it")
        self.g, self.bin = g, n // g
        self.model_bin = e // g if g < e else 1  # coarser than the window: bin the model intensity too
        self._pad = max(g - e, 0) // 2
        self._gm = max(g, e)  # the grid the exit wave is transformed on
        # each FFT sample stands for prebinned·n/gm detector pixels: centre it where the binned data are
        self._probe_g = self.probe * binning_ramp(e, self._gm, self.prebinned * n // self._gm)
        self.valid = None
        if self.mask is not None:  # a binned pixel is valid only when every detector pixel in it is
            bad = bin_frames((np.asarray(self.mask) != 0).astype(np.float32), self.bin)
            self.valid = np.fft.ifftshift(bad == 0)

    def choose_grid(self, mean_counts: float) -> int:
        """Finest grid (dividing the frame and the window, ≤ window) with ≥ min_counts counts per pixel.

        Fine grids see small errors, coarse ones beat shot noise. min_counts 1 was chosen on the CNN's own
        patches (the errors the service ranks), which want finer grids at low dose than degraded true
        patches do: grid 64 at 10⁴ photons, 128 from 10⁵ (docs/refinement.md).
        """
        ok = [g for g in range(self.e, 0, -1) if self.n % g == 0 and self.e % g == 0]
        for g in ok:
            if mean_counts / g**2 >= self.min_counts:
                return g
        return ok[-1]

    def measured(self, frames: np.ndarray) -> np.ndarray:
        """(B, G, G) float32 √(binned counts) in FFT order."""
        f = np.asarray(frames)
        if f.ndim != 3 or f.shape[1:] != (self.n, self.n):
            raise ValueError(f"frames must be (B, {self.n}, {self.n}), got shape {f.shape}")
        if self.g is None:
            self._set_grid(self.choose_grid(float(f.sum(axis=(1, 2), dtype=np.float64).mean())))
        b = bin_frames(f, self.bin, dtype=np.float32)  # strided sums straight from the detector's integers
        if np.shares_memory(b, f):  # bin 1 of float32 frames returns them: the square root below is in place
            b = b.copy()
        np.maximum(b, 0, out=b)
        np.sqrt(b, out=b)
        return np.fft.ifftshift(b, axes=(-2, -1))

    def model(self, amplitude: np.ndarray, phase: np.ndarray) -> np.ndarray:
        """(B, G, G) float32 model far-field amplitude √(Σ_k |F(P_k · patch)|²) in FFT order."""
        if self.g is None:
            raise ValueError("the comparison grid is chosen from the first frames: call with frames, or pass grid=")
        amp, ph = np.asarray(amplitude, np.float32), np.asarray(phase, np.float32)
        if amp.ndim == 4:  # (B, 1, M, M) as the ONNX model emits
            amp, ph = amp[:, 0], ph[:, 0]
        if amp.shape != ph.shape or amp.shape[1:] != (self.m, self.m):
            raise ValueError(f"patches must be (B, {self.m}, {self.m}) amplitude and phase, got {amp.shape}, "
                             f"{ph.shape}")
        patch = np.empty(amp.shape, np.complex64)  # amp·e^{iφ} from float32 cos/sin: no complex exp
        patch.real = amp * np.cos(ph)
        patch.imag = amp * np.sin(ph)
        if self.pad_by:
            d = self.pad_by
            patch = np.pad(patch, ((0, 0), (d, d), (d, d)), mode=self.pad_mode)
        gm, q, m = self._gm, self._pad, self.e
        wave = np.zeros((len(patch), self.probe.shape[0], gm, gm), np.complex64)
        np.multiply(patch[:, None], self._probe_g[None], out=wave[:, :, q:q + m, q:q + m])
        # all modes in one FFT; the exit wave is not ifftshifted: a translation is a far-field phase ramp,
        # invisible in intensity
        ff = sfft.fft2(wave, norm="ortho", workers=self.workers, overwrite_x=True)
        inten = np.abs(ff)
        np.square(inten, out=inten)
        out = inten[:, 0]
        for k in range(1, inten.shape[1]):  # Σ_k |Ψ_k|² by plain adds: multi-axis reductions are slow
            out += inten[:, k]
        if self.model_bin > 1:  # bin in detector order so that bins match the measured pattern's
            out = np.fft.ifftshift(bin_frames(np.fft.fftshift(out, axes=(-2, -1)), self.model_bin), axes=(-2, -1))
        return np.sqrt(out)

    def __call__(self, frames: np.ndarray, amplitude: np.ndarray, phase: np.ndarray) -> np.ndarray:
        """(B,) float32 normalised Fourier misfit of each frame's patch."""
        meas = self.measured(frames)
        mod = self.model(amplitude, phase)
        if len(meas) != len(mod):
            raise ValueError(f"{len(meas)} frames but {len(mod)} patches")
        d = mod - meas
        d *= d
        if self.poisson:
            # remove the expected shot-noise part of the misfit, E[(√X − √λ)²] at λ = model intensity: the
            # floor differs between frames (it follows each frame's transmitted counts) and would otherwise
            # scramble the ranking at low dose
            d -= poisson_floor(mod * mod)
        tot = meas * meas
        if self.valid is not None:
            d *= self.valid
            tot *= self.valid
        return (d.sum(axis=(1, 2)) / np.maximum(tot.sum(axis=(1, 2)), 1e-30)).astype(np.float32)


@dataclass
class ReferenceRecord:
    """One comparison of CNN output against a full-iterative reference region."""

    time_s: float
    phase_nrmse: float
    complex_nrmse: float
    median_residual: float | None


@dataclass
class QualityMonitor:
    """Residuals per batch, fallback flags, running statistics and the reference-region history.

    Threshold: a fixed `threshold` when given, else median + k_mad·1.4826·MAD of the last `window` residuals
    (robust to the outliers it is meant to catch); no frame is flagged before `warmup` residuals are seen.
    auto=False: no threshold given means no flags (the serve loop's `quality.threshold: null` = off).
    """

    residual: ForwardResidual
    threshold: float | None = None
    auto: bool = True
    k_mad: float = 4.0
    window: int = 2048
    warmup: int = 64
    _recent: deque = field(default_factory=deque, repr=False)
    n_frames: int = 0
    n_flagged: int = 0
    references: list[ReferenceRecord] = field(default_factory=list)

    def current_threshold(self) -> float | None:
        if self.threshold is not None:
            return self.threshold
        if not self.auto or len(self._recent) < self.warmup:
            return None
        r = np.fromiter(self._recent, np.float64)
        med = float(np.median(r))
        return med + self.k_mad * 1.4826 * float(np.median(np.abs(r - med)))

    def update(self, frames: np.ndarray, amplitude: np.ndarray, phase: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Residuals (B,) and fallback flags (B,) bool for one batch; flagged frames want iterative refinement."""
        r = self.residual(frames, amplitude, phase)
        return r, self.judge(r)

    def judge(self, values: np.ndarray) -> np.ndarray:
        """Fallback flags (B,) bool for per-frame figures (residuals or scores), then add them to the window."""
        v = np.asarray(values, np.float64)
        thr = self.current_threshold()  # judged against the past, so a bad burst cannot raise its own bar
        flags = v > thr if thr is not None else np.zeros(len(v), bool)
        self._recent.extend(v.tolist())
        while len(self._recent) > self.window:
            self._recent.popleft()
        self.n_frames += len(v)
        self.n_flagged += int(flags.sum())
        return flags

    def add_reference(self, cnn: np.ndarray, iterative: np.ndarray, mask: np.ndarray | None = None,
                      residuals: np.ndarray | None = None) -> ReferenceRecord:
        """Score the CNN mosaic of a region against its full-iterative reconstruction (same grid)."""
        cnn, iterative = np.asarray(cnn), np.asarray(iterative)
        if cnn.shape != iterative.shape:
            raise ValueError(f"CNN region {cnn.shape} and reference region {iterative.shape} differ in shape")
        rec = ReferenceRecord(time.time(), phase_nrmse(cnn, iterative, mask), complex_nrmse(cnn, iterative, mask),
                              None if residuals is None or len(residuals) == 0 else float(np.median(residuals)))
        self.references.append(rec)
        return rec

    def estimated_phase_nrmse(self, residual: float) -> float | None:
        """Phase NRMSE predicted from a residual by a log-log fit over the references (None before 3)."""
        pts = [(r.median_residual, r.phase_nrmse) for r in self.references
               if r.median_residual and r.median_residual > 0 and r.phase_nrmse > 0]
        if len(pts) < 3 or residual <= 0:
            return None
        x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
        if np.ptp(x) == 0:
            return float(np.exp(y.mean()))
        slope, icpt = np.polyfit(x, y, 1)
        return float(np.exp(icpt + slope * np.log(residual)))

    def status(self) -> dict:
        """Figures for the `status` topic."""
        r = np.fromiter(self._recent, np.float64) if self._recent else np.zeros(0)
        last = self.references[-1] if self.references else None
        return {
            "frames": self.n_frames,
            "flagged": self.n_flagged,
            "flagged_fraction": self.n_flagged / self.n_frames if self.n_frames else 0.0,
            "residual_median": float(np.median(r)) if r.size else None,
            "residual_p95": float(np.percentile(r, 95)) if r.size else None,
            "threshold": self.current_threshold(),
            "references": len(self.references),
            "reference_phase_nrmse": last.phase_nrmse if last else None,
            "reference_complex_nrmse": last.complex_nrmse if last else None,
        }
