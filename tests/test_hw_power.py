"""Telemetry readers: Jetson sysfs rails and tegrastats, XRT JSON, and explicit reasons when a sensor is absent."""

from __future__ import annotations

import json

import pytest
from fakes import hide, install_vitis

from edgeptycho.hw import power


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def orin_sysfs(tmp_path):
    hw = tmp_path / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    for i, (label, mv, ma) in enumerate([("VDD_GPU_SOC", 5000, 1000), ("VDD_CPU_CV", 5000, 400),
                                         ("VIN_SYS_5V0", 5000, 1600)], start=1):
        _write(hw / f"in{i}_label", label + "\n")
        _write(hw / f"in{i}_input", f"{mv}\n")
        _write(hw / f"curr{i}_input", f"{ma}\n")
    _write(tmp_path / "sys/class/thermal/thermal_zone0/type", "gpu-thermal\n")
    _write(tmp_path / "sys/class/thermal/thermal_zone0/temp", "45500\n")
    _write(tmp_path / "sys/class/devfreq/17000000.ga10b/cur_freq", "1300500000\n")
    return tmp_path


def test_jetson_rails_power_temperature_clock(orin_sysfs):
    tel = power.jetson_telemetry(str(orin_sysfs))
    assert tel["rails_w"] == {"VDD_GPU_SOC": 5.0, "VDD_CPU_CV": 2.0, "VIN_SYS_5V0": 8.0}
    assert tel["power_w"] == 7.0  # GPU_SOC + CPU_CV: compute power on AGX Orin
    assert tel["temperature_c"] == {"gpu-thermal": 45.5} and tel["gpu_clock_mhz"] == pytest.approx(1300.5)
    assert "unavailable" not in tel


def test_missing_sensors_say_why(tmp_path, monkeypatch):
    tel = power.jetson_telemetry(str(tmp_path))
    assert tel["power_w"] is None and "INA3221" in tel["unavailable"]
    tel = power.cpu_telemetry(str(tmp_path))
    assert tel["power_w"] is None and "RAPL" in tel["unavailable"]
    monkeypatch.setattr(power.shutil, "which", lambda _: None)
    hide(monkeypatch, "pyxrt")
    tel = power.xrt_telemetry()
    assert tel["power_w"] is None and "pyxrt not importable" in tel["unavailable"] and "xbutil" in tel["unavailable"]
    tel = power.nvidia_telemetry()
    assert tel["power_w"] is None and "nvidia-smi not on PATH" in tel["unavailable"]


def test_rapl_energy_counter(tmp_path):
    _write(tmp_path / "sys/class/powercap/intel-rapl:0/energy_uj", "123456789\n")
    _write(tmp_path / "sys/class/powercap/intel-rapl:0/name", "package-0\n")
    tel = power.cpu_telemetry(str(tmp_path))
    assert tel["energy_j"] == {"package-0": 123.456789} and tel["source"] == "rapl"


def test_tegrastats_line():
    line = ("RAM 5120/62780MB (lfb 1x4MB) CPU [3%@1190,1%@1190] GR3D_FREQ 87%@[1300,1300] "
            "cpu@48.5C gpu@47.1C tj@49C VDD_GPU_SOC 9210mW/9100mW VDD_CPU_CV 1650mW/1600mW "
            "VIN_SYS_5V0 6120mW/6000mW")
    tel = power.parse_tegrastats(line)
    assert tel["power_w"] == pytest.approx(10.86) and tel["rails_w"]["VIN_SYS_5V0"] == pytest.approx(6.12)
    assert tel["gpu_load_pct"] == 87 and tel["gpu_clock_mhz"] == 1300
    assert tel["temperature_c"]["gpu"] == 47.1 and tel["temperature_c"]["tj"] == 49.0


def test_xrt_json_from_pyxrt_and_xbutil(monkeypatch):
    vitis = install_vitis(monkeypatch)
    tel = power.xrt_telemetry(0)
    assert (tel["source"], tel["power_w"], tel["temperature_c"]) == ("pyxrt", 24.5, {"fpga0": 41.0})
    report = {"devices": [{"device_id": "0000:5e:00.1", "electrical": vitis.ELECTRICAL,
                           "thermals": vitis.THERMAL["thermals"]}]}
    tel = power.parse_xrt_json(json.loads(json.dumps(report)))
    assert tel["power_w"] == 24.5 and tel["power_max_w"] == 225.0 and tel["temperature_c"] == {"fpga0": 41.0}
    assert "no power_consumption_watts" in power.parse_xrt_json({})["unavailable"]
