"""Registry: availability probes with reasons and fixes, immediate failure, explicit fallback, profiles, CLI."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
from fakes import devmem, hide, install_cuda_python, install_tensorrt, install_vitis

from edgeptycho.config import ConfigError
from edgeptycho.hw import (
    BACKENDS,
    BackendUnavailable,
    list_backends,
    load_profile,
    open_backend,
    open_with_fallback,
)
from edgeptycho.hw.registry import backend_class, profile_names

VENDOR = ("tensorrt", "pycuda", "cuda", "xir", "vart", "pyxrt")


@pytest.fixture
def no_vendor_sdks(monkeypatch):
    hide(monkeypatch, *VENDOR)
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_list_backends_reports_each_with_reason_and_fix(no_vendor_sdks):
    rows = {r["name"]: r for r in list_backends()}
    assert list(rows) == list(BACKENDS)
    for name in ("cpu", "jetson-emu", "alveo-emu"):
        assert rows[name]["available"], rows[name]
    for name, missing, fix in (("jetson", "tensorrt", "JetPack 6.1"), ("alveo", "vart", "Vitis AI 2.5"),
                               ("cuda", "no CUDA device", "torch==2.13.0")):
        assert not rows[name]["available"]
        assert missing in rows[name]["reason"] and fix in rows[name]["fix"]
    assert rows["alveo-emu"]["precisions"] == ["int8"] and rows["jetson"]["profile"] == "jetson-agx-orin"
    assert "ONNX Runtime" in rows["alveo-emu"]["summary"] and "bit-exact" in rows["alveo-emu"]["summary"]


def test_open_missing_sdk_fails_immediately_without_touching_the_model(no_vendor_sdks, tiny_onnx, hw_cache):
    with pytest.raises(BackendUnavailable) as err:
        open_backend("jetson", tiny_onnx.path, 4, "fp16")
    assert err.value.backend == "jetson" and "tensorrt" in err.value.reason and "nvidia-jetpack" in err.value.fix
    assert not hw_cache.exists()  # no engine build, no FP16 conversion attempted


def test_jetson_probe_rejects_tensorrt_8_and_missing_gpu(monkeypatch):
    install_tensorrt(monkeypatch, version="8.6.1")
    with pytest.raises(BackendUnavailable, match="8.6.1 is older than 10") as err:
        backend_class("jetson").probe()
    assert "JetPack 6.1" in err.value.fix
    install_tensorrt(monkeypatch)
    install_cuda_python(monkeypatch)
    devmem.reset(count=0)
    with pytest.raises(BackendUnavailable, match="cudaErrorNoDevice") as err:
        backend_class("jetson").probe()
    assert "video" in err.value.fix
    hide(monkeypatch, "cuda", "pycuda")
    with pytest.raises(BackendUnavailable, match="no CUDA Python binding") as err:
        backend_class("jetson").probe()
    assert "cuda-python" in err.value.fix


def test_alveo_probe_names_firmware_then_card(monkeypatch, tmp_path):
    install_vitis(monkeypatch, devices=0)
    monkeypatch.delenv("XLNX_VART_FIRMWARE", raising=False)
    monkeypatch.setattr("edgeptycho.hw.alveo.FIRMWARE_DIRS", (str(tmp_path / "none"),))
    with pytest.raises(BackendUnavailable, match="no DPUCADF8H xclbin") as err:
        backend_class("alveo").probe()
    assert "setup.sh DPUCADF8H" in err.value.fix
    xclbin = tmp_path / "dpu.xclbin"
    xclbin.write_bytes(b"x")
    monkeypatch.setenv("XLNX_VART_FIRMWARE", str(xclbin))
    with pytest.raises(BackendUnavailable, match="no Alveo card") as err:
        backend_class("alveo").probe()
    assert "XRT 2.13" in err.value.fix
    install_vitis(monkeypatch, devices=1)
    backend_class("alveo").probe()


def test_fallback_is_explicit_and_logged(no_vendor_sdks, tiny_onnx, caplog):
    with caplog.at_level(logging.WARNING, logger="edgeptycho.hw.registry"):
        backend = open_with_fallback(["jetson", "alveo", "cpu"], tiny_onnx.path, 2, "fp32")
    assert backend.name == "cpu"
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 2
    assert "'jetson' unavailable" in messages[0] and "falling back to 'alveo'" in messages[0]
    assert "falling back to 'cpu'" in messages[1]


def test_fallback_never_changes_precision(no_vendor_sdks, tiny_onnx, hw_cache):
    with pytest.raises(BackendUnavailable, match="does not support precision 'fp16'"):
        open_with_fallback(["jetson", "cpu"], tiny_onnx.path, 2, "fp16")
    backend = open_with_fallback(["jetson", ("jetson-emu", "fp16")], tiny_onnx.path, 2, "fp16")
    assert (backend.name, backend.precision) == ("jetson-emu", "fp16")


def test_unknown_backend_and_precision_are_named(tiny_onnx):
    with pytest.raises(ValueError, match="unknown backend 'tpu'.*cpu, jetson"):
        open_backend("tpu", tiny_onnx.path, 2)
    with pytest.raises(ValueError, match="supports precisions .* not 'fp16'"):
        open_backend("cpu", tiny_onnx.path, 2, "fp16")
    with pytest.raises(FileNotFoundError):
        open_backend("cpu", tiny_onnx.path.with_name("missing.onnx"), 2)


def test_every_backend_has_a_valid_profile_covering_its_precisions():
    assert set(profile_names()) == {"cpu", "cuda", "jetson-agx-orin", "alveo-u250"}
    for name in BACKENDS:
        cls = backend_class(name)
        profile = load_profile(cls.profile)
        assert set(cls.precisions) <= set(profile.precisions), name
    orin, u250 = load_profile("jetson-agx-orin"), load_profile("alveo-u250")
    assert orin.software["tensorrt"] == "10.3" and orin.software["jetpack"] == "6.1"
    assert u250.software["vitis-ai"] == "2.5" and u250.batch.static == 4
    assert {s.kind for s in orin.power_sensors} >= {"ina3221", "tegrastats"}


def test_bad_profile_names_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndescription: y\nmemory_gib: 1\nmemory_kind: host\nbatch: {default: 4, maxx: 8}\n"
                   "precisions: [fp32]\npower_sensors: []\nsoftware: {}\n")
    with pytest.raises(ConfigError, match="batch.maxx"):
        load_profile(bad)
    bad.write_text(bad.read_text().replace("maxx", "max").replace("[fp32]", "[fp64]"))
    with pytest.raises(ConfigError, match="precisions"):
        load_profile(bad)


def test_import_and_backends_json_need_no_vendor_sdk():
    """In a fresh interpreter: importing the HAL loads no SDK, and `edgeptycho backends --json` works."""
    code = ("import sys; import edgeptycho.hw; "
            f"loaded = [m for m in {VENDOR + ('torch', 'onnxruntime')!r} if m in sys.modules]; "
            "print(loaded)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    res = subprocess.run([sys.executable, "-m", "edgeptycho.cli", "backends", "--json"], capture_output=True,
                         text=True, check=True)
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert rows["cpu"]["available"] and set(rows) == set(BACKENDS)


def test_backends_table(no_vendor_sdks, capsys):
    from argparse import Namespace

    from edgeptycho.commands import backends

    assert backends.run(Namespace(json=False)) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["backend", "available", "precisions"]
    jetson = next(line for line in out.splitlines() if line.startswith("jetson "))
    assert " no " in jetson and "tensorrt not importable" in jetson
    assert "fix: install JetPack" in out
