"""Telemetry readers: Jetson INA3221/thermal sysfs and tegrastats, XRT (pyxrt / xbutil), NVIDIA (nvidia-smi / NVML), RAPL.

Every reader returns a dict with ``power_w`` (float or None), ``source`` and, when a figure is missing,
``unavailable``: why. Readers never raise for a missing sensor. ``root`` arguments let tests point the sysfs
readers at a fake tree.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

# AGX Orin rails whose sum approximates compute power (reference/deployment-toolchains.md, "Jetson power tools").
COMPUTE_RAILS = ("VDD_GPU_SOC", "VDD_CPU_CV")


def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def thermal_zones(root: str = "/") -> dict[str, float]:
    """Temperature (°C) of every /sys/class/thermal zone, by its type name."""
    temps = {}
    for zone in sorted(glob.glob(os.path.join(root, "sys/class/thermal/thermal_zone*"))):
        kind, temp = _read(f"{zone}/type"), _read(f"{zone}/temp")
        if kind and temp and temp.lstrip("-").isdigit():
            temps[kind] = int(temp) / 1000.0
    return temps


def ina3221_rails(root: str = "/") -> dict[str, float]:
    """Power (W) per INA3221 rail: in<i>_input (mV) × curr<i>_input (mA), labelled by in<i>_label."""
    rails = {}
    pattern = os.path.join(root, "sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*/in*_label")
    for label_path in sorted(glob.glob(pattern)):
        label = _read(label_path)
        idx = re.search(r"in(\d+)_label$", label_path).group(1)
        base = os.path.dirname(label_path)
        mv, ma = _read(f"{base}/in{idx}_input"), _read(f"{base}/curr{idx}_input")
        if label and mv and ma and mv.isdigit() and ma.isdigit():
            rails[label] = int(mv) * int(ma) / 1e6
    return rails


def jetson_telemetry(root: str = "/") -> dict[str, Any]:
    """Rails, compute power (VDD_GPU_SOC + VDD_CPU_CV), temperatures and GPU clock of a Jetson."""
    rails = ina3221_rails(root)
    out: dict[str, Any] = {"source": "ina3221 sysfs", "rails_w": rails, "temperature_c": thermal_zones(root)}
    compute = [rails[r] for r in COMPUTE_RAILS if r in rails]
    out["power_w"] = sum(compute) if compute else (sum(rails.values()) if rails else None)
    for dev in sorted(glob.glob(os.path.join(root, "sys/class/devfreq/*"))):
        name = os.path.basename(dev)
        if "gpu" in name or "ga10b" in name or "gv11b" in name:
            freq = _read(f"{dev}/cur_freq")
            if freq and freq.isdigit():
                out["gpu_clock_mhz"] = int(freq) / 1e6
    if not rails:
        out["unavailable"] = ("no INA3221 rails under /sys/bus/i2c/drivers/ina3221 (not a Jetson, or the hwmon "
                              "driver is not loaded); tegrastats or jtop can still report power")
    return out


_TEGRA_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]+) (\d+)mW/(\d+)mW")
_TEGRA_TEMP = re.compile(r"\b(\w+)@(-?[\d.]+)C")
_TEGRA_GR3D = re.compile(r"GR3D_FREQ (\d+)%(?:@\[?(\d+))?")


def parse_tegrastats(line: str) -> dict[str, Any]:
    """One tegrastats line → rails (W, current), compute power, temperatures, GPU load % and clock (MHz)."""
    rails = {m.group(1): int(m.group(2)) / 1000.0 for m in _TEGRA_RAIL.finditer(line)}
    temps = {m.group(1): float(m.group(2)) for m in _TEGRA_TEMP.finditer(line)}
    compute = [rails[r] for r in COMPUTE_RAILS if r in rails]
    out: dict[str, Any] = {"source": "tegrastats", "rails_w": rails, "temperature_c": temps,
                           "power_w": sum(compute) if compute else None}
    gr3d = _TEGRA_GR3D.search(line)
    if gr3d:
        out["gpu_load_pct"] = int(gr3d.group(1))
        if gr3d.group(2):
            out["gpu_clock_mhz"] = int(gr3d.group(2))
    if not rails:
        out["unavailable"] = "no NAME cur_mW/avg_mW rail figures in the tegrastats line"
    return out


def _find(obj: Any, key: str) -> list[Any]:
    """Every value stored under `key` anywhere in a nested JSON object."""
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key:
                found.append(v)
            found += _find(v, key)
    elif isinstance(obj, list):
        for v in obj:
            found += _find(v, key)
    return found


def _float(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def parse_xrt_json(electrical: Any, thermal: Any = None) -> dict[str, Any]:
    """XRT electrical/thermal reports (pyxrt get_info or xbutil examine JSON) → power_w, max, temperatures."""
    out: dict[str, Any] = {"power_w": None}
    powers = [p for p in map(_float, _find(electrical, "power_consumption_watts")) if p is not None]
    if powers:
        out["power_w"] = powers[0]
    limits = [p for p in map(_float, _find(electrical, "power_consumption_max_watts")) if p is not None]
    if limits:
        out["power_max_w"] = limits[0]
    temps = {}
    for zone in _find(thermal if thermal is not None else electrical, "thermals"):
        for t in zone if isinstance(zone, list) else []:
            if str(t.get("is_present", "true")).lower() == "true" and _float(t.get("temp_C")) is not None:
                temps[t.get("location_id") or t.get("description", "?")] = _float(t["temp_C"])
    out["temperature_c"] = temps
    if out["power_w"] is None:
        out["unavailable"] = "XRT report has no power_consumption_watts (no xclbin loaded, or an old shell)"
    return out


def xrt_telemetry(device: int | str = 0) -> dict[str, Any]:
    """Whole-board power and temperatures of an Alveo card via pyxrt, else `xbutil examine`, else why not."""
    try:
        import pyxrt
    except ImportError:
        pyxrt = None
    if pyxrt is not None:
        try:
            dev = pyxrt.device(device)
            out = parse_xrt_json(json.loads(dev.get_info(pyxrt.xrt_info_device.electrical) or "{}"),
                                 json.loads(dev.get_info(pyxrt.xrt_info_device.thermal) or "{}"))
            out["source"] = "pyxrt"
            out["device"] = dev.get_info(pyxrt.xrt_info_device.name)
            return out
        except Exception as exc:  # pyxrt raises RuntimeError subclasses without a common base
            pyxrt_error = f"pyxrt: {exc}"
    else:
        pyxrt_error = "pyxrt not importable"
    xbutil = shutil.which("xbutil")
    if xbutil is None:
        return {"power_w": None, "source": "none",
                "unavailable": f"{pyxrt_error}; xbutil not on PATH (source /opt/xilinx/xrt/setup.sh)"}
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [xbutil, "examine", "-r", "electrical", "thermal", "--format", "JSON", "-o", str(report)]
        if isinstance(device, str):
            cmd[2:2] = ["-d", device]
        try:
            subprocess.run(cmd, capture_output=True, timeout=20, check=True)
            data = json.loads(report.read_text())
        except (subprocess.SubprocessError, OSError, ValueError) as exc:
            return {"power_w": None, "source": "xbutil", "unavailable": f"{pyxrt_error}; xbutil failed: {exc}"}
    out = parse_xrt_json(data)
    out["source"] = "xbutil"
    return out


def nvidia_telemetry(index: int = 0) -> dict[str, Any]:
    """GPU power (W), temperature and SM clock via nvidia-smi, else torch.cuda's NVML helpers, else why not."""
    smi = shutil.which("nvidia-smi")
    reason = "nvidia-smi not on PATH"
    if smi:
        try:
            res = subprocess.run([smi, f"--id={index}", "--query-gpu=power.draw,temperature.gpu,clocks.sm",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10,
                                 check=True)
            power, temp, clock = (_float(v.strip()) for v in res.stdout.strip().split(",")[:3])
            out = {"source": "nvidia-smi", "power_w": power, "temperature_c": {"gpu": temp},
                   "gpu_clock_mhz": clock}
            if power is None:
                out["unavailable"] = "nvidia-smi reports no power.draw for this GPU"
            return out
        except (subprocess.SubprocessError, OSError, ValueError) as exc:
            reason = f"nvidia-smi failed: {exc}"
    try:
        import torch

        return {"source": "nvml (torch.cuda)", "power_w": torch.cuda.power_draw(index) / 1000.0,
                "temperature_c": {"gpu": float(torch.cuda.temperature(index))},
                "gpu_clock_mhz": float(torch.cuda.clock_rate(index))}
    except Exception as exc:  # ImportError, no pynvml (ModuleNotFoundError), no GPU (RuntimeError)
        return {"power_w": None, "source": "none", "unavailable": f"{reason}; NVML via torch.cuda: {exc}"}


def cpu_telemetry(root: str = "/") -> dict[str, Any]:
    """Package energy counters (RAPL, joules, cumulative: diff two readings for power) and temperatures."""
    energy = {}
    for path in sorted(glob.glob(os.path.join(root, "sys/class/powercap/intel-rapl:[0-9]*"))):
        uj = _read(f"{path}/energy_uj")
        if uj and uj.isdigit():
            energy[_read(f"{path}/name") or os.path.basename(path)] = int(uj) / 1e6
    out: dict[str, Any] = {"source": "rapl" if energy else "none", "power_w": None, "energy_j": energy,
                           "temperature_c": thermal_zones(root)}
    out["unavailable"] = ("instantaneous power: difference two energy_j readings over an interval" if energy else
                          "no readable RAPL energy counter (/sys/class/powercap/intel-rapl:*/energy_uj is absent "
                          "or root-only)")
    return out
