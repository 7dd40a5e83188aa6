"""ePIE / rPIE / mPIE ptychographic solver: sequential or batched, mixed-state probes, sub-pixel, refined positions.

One code path for numpy (CPU), CuPy and PyTorch (GPU) through physics.xp. `batch_size=1` with a fresh random
order each iteration is the classic sequential ePIE of Maiden & Rodenburg (2009); larger batches compute the
exit waves of many positions with one batched FFT and accumulate the object update of overlapping windows
before normalising it, as the PIE denominators do (rPIE, Maiden, Johnson & Li, Optica 4, 736 (2017)):

    O ← O + Σ_j conj(P_j)·Δψ_j / ((1−α)·Σ_j|P_j|² + α·max Σ_j|P_j|²)
    P ← P + Σ_j conj(O_j)·Δψ_j / ((1−β)·Σ_j|O_j|² + β·max Σ_j|O_j|²)

("epie": O ← O + α·Σ_j conj(P_j)Δψ_j / max Σ_j|P_j|², likewise for P with β). Δψ = ψ' − ψ is the exit-wave
correction of the modulus constraint with the mode-summed intensity: Ψ'_k = Ψ_k·√I / √(Σ_k|Ψ_k|²).
With noise_model="poisson" (the default) the correction is the Poisson likelihood gradient instead,
Ψ·(I/|Ψ|² − 1)/2 per mode (clipped). "mpie" (the default) is rPIE plus momentum every `momentum_every`
positions (physics.epie_updates); any method can anneal its object step over the last `anneal_iters`.

Geometry follows physics.forward: the window starts at floor(p) − n//2 and the probe is Fourier-shifted by
the fractional part of p. Measured amplitudes are stored in FFT order once, so only the unshifted orthonormal
FFT pair runs per batch (physics.xp.ArrayBackend.fft2c == ifftshift ∘ physics.fourier.far_field).

Convergence figure, per iteration: E = Σ(√I_model − √I_meas)² / Σ I_meas over valid detector pixels,
accumulated during the sweep (each batch's model before its update), as PIE codes report it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from .epie_updates import Momentum, apply_update, clip_max, orthogonalize_modes, step_gain
from .forward import window_starts
from .fourier import back_propagate
from .probes import incoherent_modes, normalize_probe, probe_diameter_px
from .xp import ArrayBackend, get_backend

METHODS = ("epie", "rpie", "mpie")
NOISE_MODELS = ("poisson", "gaussian")


@dataclass
class EpieOptions:
    """Solver settings. Defaults suit a batched rPIE from a flat or seeded object with a known probe."""

    method: str = "mpie"                # "epie" | "rpie" | "mpie" (rPIE + object momentum)
    momentum: float = 0.9               # mPIE friction η: velocity v ← η·v + (O − O_{T positions ago})
    momentum_gain: float = 0.5          # mPIE feedback: O ← O + gain·v
    momentum_every: int = 64            # mPIE: positions between momentum steps (T)
    anneal_iters: int = 0               # over the last this-many iterations the object step decays ...
    anneal_to: float = 1.0              # ... geometrically to this factor (averages down the noise)
    alpha: float = 0.05                 # object: ePIE step size, rPIE regularisation weight (0, 1]
    beta: float = 0.5                   # probe: likewise
    batch_size: int = 32                # positions per update; 1 = classic sequential ePIE
    probe_update_start: int | None = None  # first iteration (0-based) that updates the probe; None = never
    # (a known probe is best left fixed: updating it from the measured probe raised the phase NRMSE at 1e6
    # photons, see docs/BENCHMARKS.md; refine() turns it on, from 0, for an estimated probe)
    position_update_start: int | None = None  # first iteration that refines positions; None = never
    position_step: float = 1.0          # gain on the least-squares position shift
    max_position_step: float = 0.5      # px per iteration, per position
    orthogonalize_modes: bool = True    # keep incoherent probe modes orthogonal, by decreasing power
    noise_model: str = "poisson"        # exit-wave correction: "poisson" (ML) | "gaussian" (modulus projection)
    poisson_clip: float = 5.0           # largest Poisson correction factor (r² − 1)/2 (r = √I/|Ψ| ≤ 3.3)
    fix_probe_power: bool = True        # hold Σ|P|² at its initial value: removes the P·c, O/c scale drift
    subpixel: bool = True               # Fourier-shift the probe by fractional positions (else round them)
    scatter: str = "auto"               # "auto" | "loop" | "add_at"  (see ArrayBackend.scatter_add)
    seed: int = 0                       # random visiting order
    cache_mb: float = 512.0             # memory for caching sub-pixel-shifted probes (0 = recompute always)
    backend: str = "numpy"              # "numpy" | "cupy" | "torch" | "auto"
    device: str | None = None
    workers: int = -1                   # scipy.fft threads on the CPU

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("alpha", "beta"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {v}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.noise_model not in NOISE_MODELS:
            raise ValueError(f"noise_model must be one of {NOISE_MODELS}, got {self.noise_model!r}")
        if self.poisson_clip <= 0:
            raise ValueError(f"poisson_clip must be > 0, got {self.poisson_clip}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum (mPIE friction) must be in [0, 1), got {self.momentum}")
        if not 0.0 <= self.momentum_gain <= 1.0:
            raise ValueError(f"momentum_gain must be in [0, 1], got {self.momentum_gain}")
        if self.momentum_every < 1:
            raise ValueError(f"momentum_every must be >= 1 position, got {self.momentum_every}")
        if self.anneal_iters < 0 or not 0.0 < self.anneal_to <= 1.0:
            raise ValueError(f"anneal_iters must be >= 0 and anneal_to in (0, 1], got {self.anneal_iters}, "
                             f"{self.anneal_to}")


@dataclass
class EpieResult:
    """Solver output, host numpy arrays on the object grid the solver was given."""

    object: np.ndarray            # (H, W) complex64
    probe: np.ndarray             # (K, n, n) complex64
    positions_px: np.ndarray      # (N, 2) final (refined) positions
    convergence: np.ndarray       # (iterations,) normalised Fourier misfit E
    seconds: np.ndarray = field(default_factory=lambda: np.zeros(0))  # wall time per iteration
    snapshots: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (iterations done, object)


Callback = Callable[[int, float], None]


def measured_amplitudes(frames: np.ndarray, chunk: int = 64) -> np.ndarray:
    """(N, n, n) float32 √I in FFT order (zero frequency at index 0) from detector-order counts."""
    frames = np.asarray(frames)
    out = np.empty(frames.shape, np.float32)
    for i in range(0, len(frames), chunk):
        a = np.maximum(frames[i:i + chunk].astype(np.float32), 0.0)
        out[i:i + chunk] = np.fft.ifftshift(np.sqrt(a), axes=(-2, -1))
    return out


def estimate_probe(frames: np.ndarray, diameter_px: float | None = None, n_modes: int = 1) -> np.ndarray:
    """Initial probe guess (K, n, n) from the mean pattern, for scans that come without a probe.

    √(mean I) is taken as the probe's far-field modulus with a flat phase and back-propagated (a centred,
    focus-like spot at window index n//2), then cut by a disc of `diameter_px` (default: half the 90 %
    diameter of the mean pattern's Patterson function, the exit waves' autocorrelation, whose support is
    about twice the beam's) and scaled so that Σ|P|² equals the mean frame sum (ortho FFTs conserve energy).
    The flat far-field phase is right for a focused beam only: a strongly defocused probe starts far off and
    needs the probe update (and a conservative alpha) to get there; use the measured probe when there is one.
    """
    frames = np.asarray(frames)
    n = frames.shape[-1]
    mean = np.maximum(frames.mean(axis=0, dtype=np.float64), 0.0)
    spot = np.fft.fftshift(back_propagate(np.sqrt(mean)))
    if diameter_px is None:
        patterson = np.abs(np.fft.fftshift(back_propagate(mean)))[None]
        diameter_px = 0.5 * probe_diameter_px(patterson)
    y = np.arange(n) - n // 2
    spot = spot * (np.hypot(y[:, None], y[None, :]) <= diameter_px / 2)
    probe = normalize_probe(spot[None], float(frames.sum(axis=(1, 2), dtype=np.float64).mean()))
    return incoherent_modes(probe, n_modes) if n_modes > 1 else probe


def _as_modes(probe: np.ndarray, n: int) -> np.ndarray:
    p = np.asarray(probe)
    p = p[None] if p.ndim == 2 else p
    if p.ndim != 3 or p.shape[-2:] != (n, n):
        raise ValueError(f"probe must be (n, n) or (K, n, n) with n = frame size {n}, got shape {p.shape}")
    return p.astype(np.complex64)


class _Solver:
    """State of one reconstruction on one backend; `iterate()` runs one sweep over all positions."""

    def __init__(self, frames: np.ndarray, positions_px: np.ndarray, probe: np.ndarray, obj: np.ndarray,
                 opts: EpieOptions, mask: np.ndarray | None):
        if frames.ndim != 3 or frames.shape[1] != frames.shape[2]:
            raise ValueError(f"frames must be (N, n, n) square, got shape {frames.shape}")
        self.n = n = frames.shape[-1]
        self.b: ArrayBackend = get_backend(opts.backend, opts.device, opts.workers)
        self.o = opts
        b = self.b
        pos = np.asarray(positions_px, np.float64)
        obj = np.asarray(obj)
        if obj.ndim != 2:
            raise ValueError(f"object must be 2-D (H, W), got shape {obj.shape}")
        window_starts(pos, n, obj.shape)  # raises, naming the position, if a window leaves the object
        self.pos = pos.copy()
        self.pos0 = pos.copy()
        self.meas = b.asarray(measured_amplitudes(frames))
        self.valid = None
        if mask is not None:
            if mask.shape != (n, n):
                raise ValueError(f"mask must be ({n}, {n}) like a frame, got {mask.shape}")
            self.valid = b.asarray(np.fft.ifftshift((np.asarray(mask) == 0).astype(np.float32)))
            self.meas *= self.valid
        self.total = b.sumsq(self.meas)
        # |Ψ| ≪ eps: the phase of Ψ is round-off, so the projection is damped there, the same on every backend
        self.eps = 1e-4 * b.scalar(self.meas.max())
        if self.total <= 0:
            raise ValueError("the measured frames hold no counts")
        self.obj = b.asarray(np.array(obj, np.complex64))  # a copy: the caller's seed is never modified
        self.probe = b.asarray(_as_modes(probe, n), b.c64)
        self.win = b.windows(self.obj, n)
        self.probe_power = b.sumsq(b.xp.abs(self.probe))
        k, bs = self.probe.shape[0], min(opts.batch_size, len(pos))
        self.acc_num = b.zeros(obj.shape, b.c64)
        self.acc_den = b.zeros(obj.shape, b.f32)
        self.psi = b.empty((bs, k, n, n), b.c64)
        self.amp = b.empty((bs, n, n), b.f32)
        self.diff = b.empty((bs, n, n), b.f32)
        self.onum = b.empty((bs, n, n), b.c64)
        self.rng = np.random.default_rng(opts.seed)
        # shifted probes of every position, reused while neither the probe nor the positions change;
        # allocated on first use (integer positions or a probe updated every sweep never need it)
        self.cache = None
        self.cache_ok = len(pos) * k * n * n * 8 <= opts.cache_mb * 2**20
        self.cached = np.zeros(len(pos), bool)
        self.iteration = 0
        self.gain = 1.0      # object step factor (annealing)
        self.since = 0       # positions since the last momentum step
        mpie = opts.method == "mpie"
        self.mom_obj = Momentum(b, self.obj, opts.momentum, opts.momentum_gain) if mpie else None
        self.mom_probe = (Momentum(b, self.probe, opts.momentum, opts.momentum_gain)
                          if mpie and opts.probe_update_start is not None else None)

    # -- one batch -----------------------------------------------------------------------------------
    def _step(self, idx: np.ndarray, starts: np.ndarray, frac: np.ndarray | None,
              upd_probe: bool, upd_pos: bool) -> float:
        b, xp, o, n = self.b, self.b.xp, self.o, self.n
        nb, k = len(idx), self.probe.shape[0]
        op = self.win[b.index(starts[:, 0]), b.index(starts[:, 1])]       # (nb, n, n) gathered copy
        if frac is not None:
            ramps = b.shift_ramps(frac, n)                                  # (nb, n, n)
            pj = self._shifted_probes(idx, ramps, upd_probe)                # (nb, k, n, n)
        else:
            pj = self.probe[None]                                           # (1, k, n, n)
        psi = self.psi[:nb]
        xp.multiply(pj, op[:, None], out=psi)
        big = b.fft2c(psi)                                                  # far fields, FFT order
        amp, diff = self.amp[:nb], self.diff[:nb]
        if k == 1:
            xp.abs(big[:, 0], out=amp)
        else:
            amp[...] = 0
            for m in range(k):
                amp += big[:, m].real ** 2 + big[:, m].imag ** 2
            xp.sqrt(amp, out=amp)
        meas = self.meas[b.index(idx)]
        if self.valid is not None:
            amp *= self.valid
        xp.subtract(meas, amp, out=diff)                                    # √I − |Ψ|
        err = b.sumsq(diff)
        # Ψ' − Ψ = Ψ·(√I/|Ψ| − 1) = Ψ·diff/(|Ψ| + eps); masked pixels have diff = 0 and keep the model.
        amp += self.eps
        xp.divide(diff, amp, out=diff)
        if o.noise_model == "poisson":
            # Poisson ML: ∂L/∂Ψ* ∝ Ψ·(1 − I/|Ψ|²), so the correction factor r − 1 (r = √I/|Ψ|) becomes
            # (r² − 1)/2 = (r − 1)(r + 1)/2, clipped where a near-zero model meets counts
            diff *= (diff + 2.0) * 0.5
            clip_max(b, diff, o.poisson_clip)
        big *= diff[:, None]
        delta = b.ifft2c(big)                                               # (nb, k, n, n) exit-wave corrections
        pint = (self.probe.real ** 2 + self.probe.imag ** 2).sum(0)        # (n, n) Σ_k |P_k|²
        onum = self.onum[:nb]
        xp.multiply(pj[:, 0].conj(), delta[:, 0], out=onum)
        for m in range(1, k):
            onum += pj[:, m].conj() * delta[:, m]
        if upd_pos:
            self._position_step(idx, op, onum, pint)
        if upd_probe:
            pnum = op.conj()[:, None] * delta                               # (nb, k, n, n)
            if frac is not None:                                            # back to the unshifted probe frame
                pnum = b.ifft2c((b.fft2c(pnum) * ramps.conj()[:, None]).sum(0))
            else:
                pnum = pnum.sum(0)
            pden = (op.real ** 2 + op.imag ** 2).sum(0)
            apply_update(b, o.method, self.probe, pnum, pden, o.beta)
            if o.fix_probe_power:
                self.probe *= (self.probe_power / max(b.sumsq(b.xp.abs(self.probe)), 1e-30)) ** 0.5
        # object: accumulate the batch's overlapping windows, then normalise once
        b.scatter_add(self.acc_num, onum, starts, o.scatter)
        b.scatter_add(self.acc_den, xp.broadcast_to(pint, (nb, n, n)), starts, o.scatter)
        r0, c0 = starts.min(0)
        r1, c1 = starts.max(0) + n
        num, den = self.acc_num[r0:r1, c0:c1], self.acc_den[r0:r1, c0:c1]
        apply_update(b, o.method, self.obj[r0:r1, c0:c1], num, den, o.alpha, self.gain)
        num[...] = 0
        den[...] = 0
        return err

    def _shifted_probes(self, idx: np.ndarray, ramps, upd_probe: bool):
        """Probe modes Fourier-shifted to each position's fraction; cached while probe and positions stay put."""
        b = self.b
        if self.cache is not None and self.cached[idx].all():
            return self.cache[b.index(idx)]
        pj = b.ifft2c(b.fft2c(b.copy(self.probe))[None] * ramps[:, None])
        if self.cache_ok and not upd_probe:
            if self.cache is None:
                self.cache = b.empty((len(self.pos), *self.probe.shape), b.c64)
            self.cache[b.index(idx)] = pj
            self.cached[idx] = True
        return pj

    def _position_step(self, idx: np.ndarray, op, onum, pint) -> None:
        """Least-squares shift per position: δ = Re⟨P·∂O, Δψ⟩ / ‖P·∂O‖² along rows and columns, clipped."""
        xp, o = self.b.xp, self.o
        shifts = []
        for axis in (1, 2):
            g = xp.zeros_like(op)
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            mid = [slice(None)] * 3
            lo[axis], hi[axis], mid[axis] = slice(None, -2), slice(2, None), slice(1, -1)
            g[tuple(mid)] = (op[tuple(hi)] - op[tuple(lo)]) * 0.5
            num = (g.conj() * onum).real.sum((1, 2))
            den = ((g.real ** 2 + g.imag ** 2) * pint).sum((1, 2))
            shifts.append(self.b.to_numpy(num) / np.maximum(self.b.to_numpy(den), 1e-30))
        d = o.position_step * np.stack(shifts, axis=1)
        self.pos[idx] += np.clip(d, -o.max_position_step, o.max_position_step)

    # -- one sweep -----------------------------------------------------------------------------------
    def iterate(self, n_iters: int = 0) -> float:
        """One sweep; `n_iters` is the run's length, which the step annealing counts down from."""
        o, n = self.o, self.n
        it = self.iteration
        self.gain = step_gain(it, n_iters, o.anneal_iters, o.anneal_to)
        upd_probe = o.probe_update_start is not None and it >= o.probe_update_start
        upd_pos = o.position_update_start is not None and it >= o.position_update_start
        pos = self.pos if o.subpixel else np.round(self.pos)
        starts, frac = window_starts(pos, n, tuple(self.obj.shape))
        moving = bool(frac.any())
        order = self.rng.permutation(len(pos))
        err = 0.0
        bs = o.batch_size
        for b0 in range(0, len(order), bs):
            idx = order[b0:b0 + bs]
            err += self._step(idx, starts[idx], frac[idx] if moving else None, upd_probe, upd_pos)
            if self.mom_obj is not None:
                self.since += len(idx)
                if self.since >= o.momentum_every:
                    self._momentum(upd_probe)
                    self.since = 0
        if upd_probe or upd_pos:
            self.cached[:] = False
        if upd_pos:
            self._keep_positions_inside()
        if upd_probe and o.orthogonalize_modes and self.probe.shape[0] > 1:
            orthogonalize_modes(self.b, self.probe)
            if self.mom_probe is not None:
                self.mom_probe.reset(self.probe)
        self.iteration += 1
        return err / self.total

    def _momentum(self, upd_probe: bool) -> None:
        self.mom_obj.step(self.obj, self.gain)  # annealed with the step: momentum amplifies noise at the floor
        if self.mom_probe is None:
            return
        if not upd_probe:  # probe not updated yet: keep its history current, so momentum starts from rest
            self.mom_probe.reset(self.probe)
            return
        self.mom_probe.step(self.probe)
        self.cached[:] = False
        if self.o.fix_probe_power:
            self.probe *= (self.probe_power / max(self.b.sumsq(self.b.xp.abs(self.probe)), 1e-30)) ** 0.5

    def _keep_positions_inside(self) -> None:
        # a common drift of all positions is a shift of the whole object, not information: remove it
        self.pos -= (self.pos - self.pos0).mean(0)
        n, (h, w) = self.n, tuple(self.obj.shape)
        self.pos[:, 0] = np.clip(self.pos[:, 0], n // 2, h - n + n // 2 - 1e-6)
        self.pos[:, 1] = np.clip(self.pos[:, 1], n // 2, w - n + n // 2 - 1e-6)

    def result(self, convergence: list[float], seconds: list[float]) -> EpieResult:
        b = self.b
        return EpieResult(b.to_numpy(self.obj).copy(), b.to_numpy(self.probe).copy(), self.pos.copy(),
                          np.asarray(convergence, np.float64), np.asarray(seconds, np.float64))


def solve(frames: np.ndarray, positions_px: np.ndarray, probe: np.ndarray, obj: np.ndarray, n_iters: int,
          options: EpieOptions | None = None, mask: np.ndarray | None = None,
          callback: Callback | None = None, snapshot_every: int = 0, **overrides) -> EpieResult:
    """Run `n_iters` ePIE/rPIE sweeps on arrays and return the object, probe, positions and convergence.

    frames (N, n, n) detector order (zero frequency at the centre); positions_px (N, 2) (row, col) window
    centres on the grid of `obj` (H, W); probe (n, n) or (K, n, n) at that pixel size; mask (n, n) nonzero =
    invalid pixel. `overrides` replace fields of `options`. callback(iteration, misfit) after each sweep;
    snapshot_every > 0 keeps a copy of the object every that many iterations (for quality-vs-time curves).
    """
    opts = replace(options or EpieOptions(), **overrides)
    if n_iters < 0:
        raise ValueError(f"n_iters must be >= 0, got {n_iters}")
    frames = np.asarray(frames)
    if len(positions_px) != len(frames):
        raise ValueError(f"{len(frames)} frames but {len(positions_px)} positions")
    s = _Solver(frames, positions_px, probe, obj, opts, mask)
    conv, secs, snaps = [], [], []
    for it in range(n_iters):
        t0 = time.perf_counter()
        e = s.iterate(n_iters)
        s.b.synchronize()
        secs.append(time.perf_counter() - t0)
        conv.append(e)
        if callback is not None:
            callback(it, e)
        if snapshot_every and (it + 1) % snapshot_every == 0:
            snaps.append((it + 1, s.b.to_numpy(s.obj).copy()))
    res = s.result(conv, secs)
    res.snapshots = snaps
    return res
