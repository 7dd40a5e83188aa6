"""Illumination models: Gaussian and zone-plate probes, Fresnel propagation, incoherent modes, loading, sizing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.fft as sfft

from .fourier import back_propagate, far_field

_WORKERS = -1


def _radius_grid(n: int) -> np.ndarray:
    """Distance (px) of every pixel from the window centre n//2 (the project's probe-centre convention)."""
    y = np.arange(n) - n // 2
    return np.hypot(y[:, None], y[None, :])


def gaussian_probe(n: int, fwhm_px: float, curvature_px: float = 0.0) -> np.ndarray:
    """(n, n) complex64 Gaussian beam of intensity FWHM `fwhm_px`, centred at n//2.

    `curvature_px` > 0 adds a quadratic phase φ = π r² / curvature_px² (a defocused beam's wavefront); the
    default is a flat waist, whose far field is a single narrow peak.
    """
    if n <= 0 or fwhm_px <= 0:
        raise ValueError(f"gaussian_probe needs n > 0 and fwhm_px > 0, got n={n}, fwhm_px={fwhm_px}")
    r = _radius_grid(n)
    # intensity exp(-4 ln2 r²/fwhm²) → amplitude with half the exponent
    amp = np.exp(-2.0 * np.log(2.0) * r**2 / fwhm_px**2)
    phase = np.pi * r**2 / curvature_px**2 if curvature_px else 0.0
    return (amp * np.exp(1j * phase)).astype(np.complex64)


def fresnel_propagate(field: np.ndarray, pixel_m: float, wavelength_m: float, distance_m: float) -> np.ndarray:
    """Propagate a field (..., n, n) by `distance_m` (may be negative) on the same grid (angular spectrum).

    Why the transfer-function (angular-spectrum) method: it is exact, H = exp(i·2πz·(√(1/λ² − f²) − 1/λ)),
    for a band-limited periodic field, and keeps the sample-plane pixel, which is what a defocused probe
    needs. Its textbook limit z ≤ L·Δx/λ (Voelz & Roggemann 2009) is the worst case of a field filling the
    whole band; what actually matters is that the phase of H stays sampled where the field has power,
    i.e. that light at the field's highest frequency f_b travels λ·z·f_b ≤ L/2 and so stays in the window.
    That is checked here from the field's own spectrum. The impulse-response method only pays off for
    longer distances, where the beam would leave this window anyway and a rescaled output grid is needed.
    """
    if pixel_m <= 0 or wavelength_m <= 0:
        raise ValueError(f"pixel_m and wavelength_m must be positive, got {pixel_m}, {wavelength_m}")
    field = np.asarray(field)
    if distance_m == 0:
        return field.copy()
    ny, nx = field.shape[-2:]
    ctype = np.complex64 if field.dtype in (np.complex64, np.float32) else np.complex128
    spec = sfft.fft2(field.astype(ctype, copy=False), workers=_WORKERS)
    fy = sfft.fftfreq(ny, d=pixel_m)[:, None]
    fx = sfft.fftfreq(nx, d=pixel_m)[None, :]
    f2 = fy**2 + fx**2
    power = np.sum(np.abs(spec.reshape(-1, ny, nx)) ** 2, axis=0).ravel()
    order = np.argsort(f2.ravel())
    cum = np.cumsum(power[order])
    f_band = np.sqrt(f2.ravel()[order][np.searchsorted(cum, 0.999 * cum[-1])])  # 99.9 % of the power
    spread = wavelength_m * abs(distance_m) * f_band
    if spread > 0.5 * min(ny, nx) * pixel_m:
        raise ValueError(
            f"propagating {distance_m:.3g} m spreads the field by {spread / pixel_m:.0f} px, more than half the "
            f"{min(ny, nx)}-px window: use a larger window or a shorter distance"
        )
    arg = 1.0 / wavelength_m**2 - f2
    # the common phase 2πz/λ is dropped (a global phase); evanescent components are removed
    kz = np.sqrt(np.maximum(arg, 0.0)) - 1.0 / wavelength_m
    h = np.where(arg > 0, np.exp(2j * np.pi * distance_m * kz), 0.0)
    return sfft.ifft2(spec * h.astype(ctype), workers=_WORKERS)


def zone_plate_probe(
    n: int,
    pixel_m: float,
    wavelength_m: float,
    diameter_m: float,
    outer_zone_m: float,
    central_stop: float = 0.3,
    defocus_m: float = 0.0,
) -> np.ndarray:
    """(n, n) complex64 probe of a Fresnel zone plate with a central stop, `defocus_m` from its focus.

    The lens maps its pupil onto spatial frequencies: a zone plate of outermost zone width Δr focuses with
    NA = λ/(2Δr), so its (annular) pupil fills |f| ≤ 1/(2Δr), the inner `central_stop` fraction of the
    diameter being blocked. The focal field is the inverse transform of that pupil; the defocus plane is
    reached with fresnel_propagate. The far field of the probe is therefore the annulus itself and the
    defocused beam is ≈ 2·NA·|defocus| across. `diameter_m` sets the focal length f = D·Δr/λ, recorded for
    sanity only: the focal spot depends on NA, the sample-plane grid does not sample the lens itself.
    """
    if not 0.0 <= central_stop < 1.0:
        raise ValueError(f"central_stop must be in [0, 1), got {central_stop}")
    if min(pixel_m, wavelength_m, diameter_m, outer_zone_m) <= 0:
        raise ValueError("zone_plate_probe: pixel_m, wavelength_m, diameter_m and outer_zone_m must be positive")
    r_out = n * pixel_m / (2.0 * outer_zone_m)  # pupil edge in frequency pixels
    if r_out >= n / 2:
        raise ValueError(
            f"zone plate outer zone {outer_zone_m * 1e9:.1f} nm is not coarser than the object pixel "
            f"{pixel_m * 1e9:.1f} nm: the probe's far field (NA = λ/2Δr) would overflow the detector"
        )
    r = _radius_grid(n)
    # soft (one-pixel) edges: an antialiased pupil keeps the real-space ringing of a hard cut-off small
    pupil = np.clip(r_out + 0.5 - r, 0.0, 1.0)
    if central_stop > 0.0:
        pupil *= np.clip(r - central_stop * r_out + 0.5, 0.0, 1.0)
    # back_propagate leaves the focus at index 0; fftshift puts it on the window centre n//2
    focus = sfft.fftshift(back_propagate(pupil.astype(np.complex128)))
    probe = fresnel_propagate(focus, pixel_m, wavelength_m, defocus_m)
    probe /= np.sqrt(np.sum(np.abs(probe) ** 2))
    return probe.astype(np.complex64)


def incoherent_modes(
    probe: np.ndarray, n_modes: int, blur_px: float | tuple[float, float] = 1.0, grid: int = 7
) -> np.ndarray:
    """(K, n, n) orthogonal incoherent modes of `probe` under partial spatial coherence, by decreasing power.

    Model: a finite source images to a Gaussian spot of rms `blur_px` pixels in the sample plane (a number,
    or (σ_row, σ_col) for the usual wider horizontal synchrotron source), so the illumination is an
    incoherent sum of copies of the coherent probe shifted across that spot (a Gaussian Schell-like source).
    The copies on a `grid`×`grid` lattice over ±2.5σ, weighted by the Gaussian, are orthogonalised by an
    eigen-decomposition of their Gram matrix (the coherent-mode decomposition); the K strongest modes are
    kept and rescaled to the input's total power. Powers decrease with mode index (a round source gives
    degenerate pairs); a larger blur moves power into higher modes. K = 1 returns the probe itself.
    """
    probe = np.asarray(probe)
    if probe.ndim == 3:
        probe = probe[0]
    if n_modes < 1:
        raise ValueError(f"n_modes must be >= 1, got {n_modes}")
    sigma = np.broadcast_to(np.asarray(blur_px, dtype=np.float64), (2,))
    if (sigma < 0).any():
        raise ValueError(f"blur_px must be >= 0, got {blur_px}")
    if n_modes == 1 or not sigma.any():
        out = np.zeros((n_modes, *probe.shape), np.complex64)
        out[0] = probe
        return out
    if grid * grid < n_modes:
        raise ValueError(f"grid {grid} gives only {grid * grid} copies, fewer than n_modes={n_modes}")
    t = np.linspace(-2.5, 2.5, grid)
    sy, sx = np.meshgrid(t * sigma[0], t * sigma[1], indexing="ij")
    shifts = np.stack([sy.ravel(), sx.ravel()], axis=1)
    w = np.exp(-0.5 * ((shifts / np.maximum(sigma, 1e-12)) ** 2).sum(1))
    w /= w.sum()
    # Work in Fourier space (orthonormal FFT, so inner products are unchanged): a shift is a phase ramp, and
    # only the frequencies where the probe has power matter (a zone plate fills < 10 % of the band).
    spec = sfft.fft2(probe.astype(np.complex128), norm="ortho")
    power = np.abs(spec) ** 2
    support = power > 1e-14 * power.max()
    fy, fx = np.meshgrid(sfft.fftfreq(probe.shape[0]), sfft.fftfreq(probe.shape[1]), indexing="ij")
    phase = np.outer(shifts[:, 0], fy[support]) + np.outer(shifts[:, 1], fx[support])
    a = np.sqrt(w)[:, None] * spec[support][None, :] * np.exp(-2j * np.pi * phase)  # (copies, support)
    # eigenvectors of the small Gram matrix A·A^H give the right singular vectors of A without a big SVD
    evals, evecs = np.linalg.eigh(a @ a.conj().T)
    order = np.argsort(evals)[::-1][:n_modes]
    mode_spec = np.zeros((n_modes, *probe.shape), np.complex128)
    mode_spec[:, support] = evecs[:, order].conj().T @ a  # rows = s_k·v_k, power s_k²
    modes = sfft.ifft2(mode_spec, norm="ortho")
    modes *= np.sqrt(np.sum(power) / np.sum(np.abs(modes) ** 2))
    return modes.astype(np.complex64)


def normalize_probe(modes: np.ndarray, photons: float) -> np.ndarray:
    """Scale modes (K, n, n) so that the total intensity Σ_k Σ |P_k|² equals `photons` per exposure."""
    if photons <= 0:
        raise ValueError(f"photon count must be positive, got {photons}")
    modes = np.asarray(modes)
    total = float(np.sum(np.abs(modes) ** 2))
    if total == 0:
        raise ValueError("cannot normalise an all-zero probe")
    return (modes * np.sqrt(photons / total)).astype(np.complex64)


def mode_powers(modes: np.ndarray) -> np.ndarray:
    """Fraction of the total intensity carried by each mode (K,)."""
    p = np.sum(np.abs(np.asarray(modes).reshape(-1, *np.shape(modes)[-2:])) ** 2, axis=(-2, -1))
    return p / p.sum()


def probe_diameter_px(modes: np.ndarray, fraction: float = 0.9) -> float:
    """Diameter (px) of the disc about the intensity centroid holding `fraction` of the summed mode intensity.

    An encircled-energy measure is robust for rings, side lobes and noise, where a FWHM is not.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    inten = np.sum(np.abs(np.asarray(modes).reshape(-1, *np.shape(modes)[-2:])) ** 2, axis=0)
    total = inten.sum()
    if total == 0:
        raise ValueError("probe has no intensity")
    y, x = np.indices(inten.shape)
    cy, cx = (inten * y).sum() / total, (inten * x).sum() / total
    r = np.hypot(y - cy, x - cx).ravel()
    order = np.argsort(r)
    cum = np.cumsum(inten.ravel()[order]) / total
    return float(2.0 * r[order][np.searchsorted(cum, fraction)])


def _as_modes(arr: np.ndarray, source: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim == 4:  # ptychodus: (OPR modes, incoherent modes, H, W) → the mean (first) OPR mode
        arr = arr[0]
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[-1] != arr.shape[-2]:
        raise ValueError(f"{source}: probe must be (n, n), (K, n, n) or (1, K, n, n) square, got {arr.shape}")
    return arr.astype(np.complex64)


def load_probe(path: str | Path) -> np.ndarray:
    """Measured probe → (K, n, n) complex64 from .npy, .npz (key 'probe', else the only array) or HDF5.

    HDF5 / CXI: /entry_1/instrument_1/source_1/illumination (newer ptychodus CXI files soft-link it to their
    probe image), else a root 'probe' dataset (ptychodus product: OPR × incoherent × H × W → first OPR mode).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"probe file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _as_modes(np.load(path, allow_pickle=False), str(path))
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            if "probe" in z.files:
                return _as_modes(z["probe"], str(path))
            if len(z.files) == 1:
                return _as_modes(z[z.files[0]], str(path))
            raise ValueError(f"{path}: no 'probe' array among {z.files}")
    if suffix in (".h5", ".hdf5", ".cxi", ".hdf", ".nxs"):
        import h5py  # a declared dependency, imported here so physics stays light

        with h5py.File(path, "r") as f:
            for key in ("entry_1/instrument_1/source_1/illumination", "probe"):
                if key in f:
                    return _as_modes(f[key][()], f"{path}:{key}")
        raise ValueError(f"{path}: no probe found (looked for CXI entry_1/instrument_1/source_1/illumination "
                         "and a root 'probe' dataset)")
    raise ValueError(f"{path}: unknown probe file type {suffix!r}; use .npy, .npz, .h5/.hdf5/.cxi")


def fit_to_frame(modes: np.ndarray, n: int) -> np.ndarray:
    """Zero-pad probe modes (K, m, m) centrally to (K, n, n); a probe larger than the frame is an error."""
    modes = np.asarray(modes)
    m = modes.shape[-1]
    if m > n:
        raise ValueError(f"probe array {m}x{m} is larger than the detector frame {n}x{n}")
    if m == n:
        return modes.astype(np.complex64, copy=False)
    out = np.zeros((modes.shape[0], n, n), np.complex64)
    o = n // 2 - m // 2  # keep the probe centre (index m//2) on the frame centre (index n//2)
    out[:, o : o + m, o : o + m] = modes
    return out


def probe_far_field_intensity(modes: np.ndarray) -> np.ndarray:
    """Summed far-field intensity (n, n) of the probe alone (what the detector sees without a sample)."""
    return np.sum(np.abs(far_field(np.asarray(modes))) ** 2, axis=0)
