"""Simulated ptychographic scans: a validated spec (geometry, probe, object, scan, noise), presets, simulate()."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from . import forward, objects, probes, scans
from .fourier import EV, object_pixel_size, wavelength_from_energy
from .types import ScanData

PROBE_KINDS = ("gaussian", "zone-plate", "file")
NOMINAL_PHOTONS = 1e6  # incident photons per pattern used for noise-free simulations (dose=None)


def _fail(name: str, value: Any, need: str) -> None:
    raise ValueError(f"{name} must be {need}, got {value!r}")


@dataclass
class GeometrySpec:
    """Beamline geometry; object pixel = λ·distance / (frame_size·detector_pixel)."""

    energy_eV: float = 10_000.0
    distance_m: float = 1.55
    detector_pixel_m: float = 75e-6
    frame_size: int = 256

    def __post_init__(self) -> None:
        for name in ("energy_eV", "distance_m", "detector_pixel_m"):
            if not getattr(self, name) > 0:
                _fail(f"geometry.{name}", getattr(self, name), "> 0")
        if int(self.frame_size) != self.frame_size or self.frame_size < 8:
            _fail("geometry.frame_size", self.frame_size, "an integer >= 8")

    @property
    def wavelength_m(self) -> float:
        return wavelength_from_energy(self.energy_eV * EV)

    @property
    def object_pixel_m(self) -> float:
        return object_pixel_size(self.wavelength_m, self.distance_m, int(self.frame_size), self.detector_pixel_m)


@dataclass
class ProbeSpec:
    """Illumination: a Gaussian beam, a defocused zone plate with central stop, or a measured probe file."""

    kind: str = "zone-plate"
    fwhm_px: float = 20.0                   # gaussian
    zp_diameter_m: float = 160e-6           # zone plate (sets the focal length only)
    outer_zone_m: float = 30e-9             # zone plate: NA = λ / (2·outer zone)
    central_stop: float = 0.3               # fraction of the diameter blocked
    defocus_m: float = 133e-6               # sample downstream of focus
    n_modes: int = 3                        # incoherent modes (file probes: used only if the file has one)
    coherence_blur_px: float | tuple[float, float] = (0.8, 1.2)  # rms source image (row, col), px
    path: str | None = None                 # file

    def __post_init__(self) -> None:
        if self.kind not in PROBE_KINDS:
            _fail("probe.kind", self.kind, f"one of {', '.join(PROBE_KINDS)}")
        for name in ("fwhm_px", "zp_diameter_m", "outer_zone_m"):
            if not getattr(self, name) > 0:
                _fail(f"probe.{name}", getattr(self, name), "> 0")
        if not 0 <= self.central_stop < 1:
            _fail("probe.central_stop", self.central_stop, "in [0, 1)")
        if int(self.n_modes) != self.n_modes or self.n_modes < 1:
            _fail("probe.n_modes", self.n_modes, "an integer >= 1")
        if isinstance(self.coherence_blur_px, list):
            self.coherence_blur_px = tuple(self.coherence_blur_px)
        if (np.asarray(self.coherence_blur_px, dtype=float) < 0).any():
            _fail("probe.coherence_blur_px", self.coherence_blur_px, ">= 0")
        if self.kind == "file" and not self.path:
            _fail("probe.path", self.path, "a probe file (.npy/.npz/.h5/.cxi) when probe.kind is 'file'")


@dataclass
class ObjectSpec:
    """Ground-truth object; None picks the kind's default phase range / amplitude floor."""

    kind: str = "siemens-star"
    phase_range: float | None = None
    amplitude_min: float | None = None
    params: dict[str, Any] = field(default_factory=dict)  # kind-specific, e.g. n_spokes, feature_px

    def __post_init__(self) -> None:
        if self.kind not in objects.OBJECT_KINDS:
            _fail("object.kind", self.kind, f"one of {', '.join(objects.OBJECT_KINDS)}")
        if self.phase_range is not None and not self.phase_range >= 0:
            _fail("object.phase_range", self.phase_range, ">= 0 rad")
        if self.amplitude_min is not None and not 0 < self.amplitude_min <= 1:
            _fail("object.amplitude_min", self.amplitude_min, "in (0, 1]")


@dataclass
class ScanSpec:
    """Trajectory; the step follows from the overlap and the probe's 90 %-intensity diameter."""

    kind: str = "spiral"
    n_positions: int = 1000
    overlap: float = 0.7
    jitter_px: float = 0.0
    margin_px: int = 8

    def __post_init__(self) -> None:
        if self.kind not in scans.SCAN_KINDS:
            _fail("scan.kind", self.kind, f"one of {', '.join(scans.SCAN_KINDS)}")
        if int(self.n_positions) != self.n_positions or self.n_positions < 1:
            _fail("scan.n_positions", self.n_positions, "an integer >= 1")
        if not 0 <= self.overlap < 1:
            _fail("scan.overlap", self.overlap, "in [0, 1)")
        if not self.jitter_px >= 0:
            _fail("scan.jitter_px", self.jitter_px, ">= 0")
        if int(self.margin_px) != self.margin_px or self.margin_px < 0:
            _fail("scan.margin_px", self.margin_px, "an integer >= 0")


@dataclass
class NoiseSpec:
    """Detector: dose = incident photons per pattern (None: noise-free at NOMINAL_PHOTONS), background
    photons per pixel added before Poisson sampling, saturation count (None: no clipping)."""

    dose: float | None = 1e6
    background: float = 0.0
    saturation: float | None = None

    def __post_init__(self) -> None:
        if self.dose is not None and not self.dose > 0:
            _fail("noise.dose", self.dose, "> 0 photons per pattern (or null for noise-free)")
        if not self.background >= 0:
            _fail("noise.background", self.background, ">= 0")
        if self.saturation is not None and not self.saturation > 0:
            _fail("noise.saturation", self.saturation, "> 0 (or null)")


_SECTIONS = {"geometry": GeometrySpec, "probe": ProbeSpec, "object": ObjectSpec, "scan": ScanSpec,
             "noise": NoiseSpec}


@dataclass
class SimulationSpec:
    """Everything simulate() needs; to_dict/from_dict round-trip through YAML/JSON."""

    geometry: GeometrySpec = field(default_factory=GeometrySpec)
    probe: ProbeSpec = field(default_factory=ProbeSpec)
    object: ObjectSpec = field(default_factory=ObjectSpec)
    scan: ScanSpec = field(default_factory=ScanSpec)
    noise: NoiseSpec = field(default_factory=NoiseSpec)
    name: str = "custom"

    def __post_init__(self) -> None:
        for key, cls in _SECTIONS.items():
            if not isinstance(getattr(self, key), cls):
                _fail(key, type(getattr(self, key)).__name__, f"a {cls.__name__}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if isinstance(d["probe"]["coherence_blur_px"], tuple):
            d["probe"]["coherence_blur_px"] = list(d["probe"]["coherence_blur_px"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SimulationSpec:
        """Build from nested dicts; missing keys take defaults, unknown keys are errors naming them."""
        unknown = set(d) - set(_SECTIONS) - {"name"}
        if unknown:
            raise ValueError(f"unknown simulation key(s) {sorted(unknown)}; expected {sorted(_SECTIONS)} or name")
        parts: dict[str, Any] = {}
        for key, sub in _SECTIONS.items():
            given = d.get(key) or {}
            names = {f.name for f in dataclasses.fields(sub)}
            bad = set(given) - names
            if bad:
                raise ValueError(f"unknown key(s) {sorted(f'{key}.{b}' for b in bad)}; allowed: {sorted(names)}")
            parts[key] = sub(**given)
        return cls(**parts, name=d.get("name", "custom"))

    def replace(self, **sections: dict[str, Any]) -> SimulationSpec:
        """Copy with some fields of some sections changed, e.g. spec.replace(scan={"n_positions": 100})."""
        d = self.to_dict()
        for key, changes in sections.items():
            if key == "name":
                d["name"] = changes
                continue
            if key not in _SECTIONS:
                raise ValueError(f"unknown simulation section {key!r}; expected one of {sorted(_SECTIONS)}")
            d[key].update(changes)
        return SimulationSpec.from_dict(d)


def _presets() -> dict[str, SimulationSpec]:
    # 10 keV, 75 µm pixels, 1.55 m: 256-px frames give 10.0 nm object pixels; the 30-nm zone plate's far-field
    # annulus then spans 43 px of radius (inside the 128-px half frame, and inside a 2×-binned 64 px), and a
    # 133-µm defocus makes the beam ≈ 57 px across (90 % intensity): oversampling > 4 in a 256 window, > 2 in 128.
    demo = SimulationSpec(name="siemens-star")
    raster = ScanSpec(kind="raster", n_positions=1000, overlap=0.7, jitter_px=0.5)
    specs = {
        "siemens-star": demo,
        "ic": dataclasses.replace(demo, name="ic", object=ObjectSpec(kind="ic"), scan=raster),
        "cells": dataclasses.replace(demo, name="cells", object=ObjectSpec(kind="cells"), scan=raster),
        "texture": dataclasses.replace(demo, name="texture", object=ObjectSpec(kind="texture"), scan=raster),
        # 64-px frames at the same 10-nm pixel (distance scaled by 64/256); beam ≈ 20 px; seconds → milliseconds
        "small": SimulationSpec(
            name="small",
            geometry=GeometrySpec(distance_m=1.55 * 64 / 256, frame_size=64),
            probe=ProbeSpec(defocus_m=48e-6, n_modes=2),
            object=ObjectSpec(kind="siemens-star", params={"n_spokes": 16}),
            scan=ScanSpec(kind="raster", n_positions=49, overlap=0.7, jitter_px=0.5, margin_px=4),
            noise=NoiseSpec(dose=1e5),
        ),
    }
    return specs


PRESET_NAMES = ("siemens-star", "ic", "cells", "texture", "small")


def preset(name: str) -> SimulationSpec:
    """A fresh copy of the named preset spec."""
    if name not in PRESET_NAMES:
        raise ValueError(f"unknown simulation preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    return _presets()[name]


def make_probe(spec: SimulationSpec) -> np.ndarray:
    """Unit-power probe modes (K, n, n) for the spec's geometry, before normalisation to the dose."""
    g, p = spec.geometry, spec.probe
    n = int(g.frame_size)
    if p.kind == "gaussian":
        base = probes.gaussian_probe(n, p.fwhm_px)[None]
    elif p.kind == "zone-plate":
        base = probes.zone_plate_probe(n, g.object_pixel_m, g.wavelength_m, p.zp_diameter_m, p.outer_zone_m,
                                       p.central_stop, p.defocus_m)[None]
    else:
        base = probes.fit_to_frame(probes.load_probe(p.path), n)
    modes = probes.incoherent_modes(base[0], p.n_modes, p.coherence_blur_px) if len(base) == 1 else base
    return probes.normalize_probe(modes, 1.0)


def simulate(spec: SimulationSpec, seed: int = 0, progress: Callable[[int, int], None] | None = None) -> ScanData:
    """Simulate a scan: probe → scan → object → far-field intensities → detector noise, all from `seed`."""
    g = spec.geometry
    n = int(g.frame_size)
    dx = g.object_pixel_m
    s_obj, s_scan, s_noise = np.random.SeedSequence(seed).spawn(3)
    modes = make_probe(spec)
    diameter = probes.probe_diameter_px(modes)
    if diameter >= n:
        raise ValueError(f"probe ({diameter:.0f} px across) is larger than the detector frame's {n}-px window")
    step = scans.step_from_overlap(diameter, spec.scan.overlap)
    pos = scans.make_scan(spec.scan.kind, spec.scan.n_positions, step, spec.scan.jitter_px,
                          np.random.default_rng(s_scan), window=n, margin=spec.scan.margin_px)
    shape = scans.object_shape_for_scan(pos, n, spec.scan.margin_px)
    params = dict(spec.object.params)
    if spec.object.kind == "siemens-star" and "radius_frac" not in params:
        # fit the star to the scanned field: positions' half-span plus half a probe diameter
        span = 0.5 * float(np.ptp(pos, axis=0).min()) + 0.5 * diameter
        params["radius_frac"] = min(0.45, span / min(shape))
    obj = objects.make_object(spec.object.kind, shape, int(s_obj.generate_state(1)[0]),
                              spec.object.phase_range, spec.object.amplitude_min, **params)
    photons = spec.noise.dose if spec.noise.dose is not None else NOMINAL_PHOTONS
    modes = probes.normalize_probe(modes, photons)
    intensity = forward.diffraction_intensity(obj, modes, pos, progress=progress, frame_size=n)
    mean_counts = float(intensity.sum(axis=(1, 2), dtype=np.float64).mean())
    # dose is the incident photon count the probe carries; add_noise's dose is the detected mean, so passing
    # the detected mean leaves the scale untouched and keeps frames consistent with the returned probe
    frames = forward.add_noise(intensity, mean_counts if spec.noise.dose is not None else None,
                               spec.noise.background, spec.noise.saturation, np.random.default_rng(s_noise))
    metadata = {
        "spec": spec.to_dict(),
        "seed": seed,
        "object_pixel_m": dx,
        "dose": photons,
        "noise_free": spec.noise.dose is None,
        "mean_counts": mean_counts,
        "probe_diameter_px": diameter,
        "step_px": step,
        "mode_powers": probes.mode_powers(modes).tolist(),
        "wavelength_m": g.wavelength_m,
    }
    if spec.name in PRESET_NAMES:
        metadata["preset"] = spec.name
    return ScanData(frames=frames, positions_m=pos * dx, energy_J=g.energy_eV * EV, distance_m=g.distance_m,
                    detector_pixel_m=g.detector_pixel_m, probe=modes, object_truth=obj, metadata=metadata)
