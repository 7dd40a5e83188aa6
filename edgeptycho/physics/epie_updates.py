"""The update rules of physics.epie on one ArrayBackend: PIE step, mPIE momentum, step annealing, mode orthogonality.

Kept apart from the solver's sweep logic so that each rule is one short function shared by numpy, CuPy and
PyTorch (operators and in-place `out=` calls only; nothing here allocates per position).

mPIE (Maiden, Johnson & Li, Optica 4, 736 (2017)) runs rPIE updates and, every T positions, adds momentum:

    v ← η·v + (X − X_T),   X ← X + γ·v

where X_T is the array as it was at the previous momentum step (X = object, or probe when it is updated),
η the friction and γ the feedback gain. The paper's form has γ = η; PtyLab's mPIE uses η = 0.7, γ = 0.3.
The defaults here (η = 0.9, γ = 0.5, T = 64) were measured on the held-out scans (docs/BENCHMARKS.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .xp import ArrayBackend


def apply_update(b: ArrayBackend, method: str, target: Any, num: Any, den: Any, weight: float,
                 gain: float = 1.0) -> None:
    """target += gain·num / ((1−w)·den + w·max den) (rPIE/mPIE) or gain·w·num / max den (ePIE), in place.

    num and den are scratch: they are overwritten (the caller zeroes or rebuilds them after).
    """
    dmax = b.scalar(den.max())
    if dmax <= 0:
        return
    if method == "epie":
        num *= gain * weight / dmax
    else:
        den *= 1.0 - weight
        den += weight * dmax
        b.xp.reciprocal(den, out=den)  # real reciprocal, then complex×real: no complex division
        if gain != 1.0:
            den *= gain
        num *= den
    target += num


def clip_max(b: ArrayBackend, a: Any, v: float) -> None:
    """a = min(a, v) in place (torch spells it clamp_)."""
    if b.name == "torch":
        a.clamp_(max=v)
    else:
        b.xp.minimum(a, v, out=a)


class Momentum:
    """mPIE momentum on one array, updated in place (views of it, e.g. the solver's windows, stay valid)."""

    def __init__(self, b: ArrayBackend, x: Any, friction: float, gain: float):
        self.velocity = b.zeros(tuple(x.shape), x.dtype)
        self.previous = b.copy(x)
        self.friction, self.gain = friction, gain

    def step(self, x: Any, scale: float = 1.0) -> None:
        """One momentum step; `scale` multiplies the feedback (the solver passes its annealed step factor)."""
        self.velocity *= self.friction
        self.velocity += x
        self.velocity -= self.previous
        x += (scale * self.gain) * self.velocity
        self.previous[...] = x

    def reset(self, x: Any) -> None:
        """Forget the history (the array changed by other means, e.g. modes re-orthogonalised)."""
        self.previous[...] = x


def step_gain(iteration: int, n_iters: int, anneal_iters: int, anneal_to: float) -> float:
    """Object step factor for 0-based `iteration` of `n_iters`: 1, then over the last `anneal_iters` a
    geometric decay that reaches `anneal_to` on the final iteration.

    A full PIE step puts each batch's shot noise straight into the object; shrinking the step at the end
    averages the corrections of many positions instead (the stochastic-gradient view of PIE).
    """
    left = n_iters - iteration
    if anneal_iters <= 0 or not 0 < left <= anneal_iters:
        return 1.0
    return float(anneal_to ** ((anneal_iters - left + 1) / anneal_iters))


def orthogonalize_modes(b: ArrayBackend, probe: Any) -> None:
    """Rotate the modes onto the eigenvectors of their Gram matrix (same total power, sorted by power)."""
    k, n = probe.shape[0], probe.shape[-1]
    p = b.to_numpy(probe).reshape(k, -1).astype(np.complex128)
    evals, evecs = np.linalg.eigh(p @ p.conj().T)
    order = np.argsort(evals)[::-1]
    new = (evecs[:, order].conj().T @ p).reshape(k, n, n).astype(np.complex64)
    probe[...] = b.asarray(new)
