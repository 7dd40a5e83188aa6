"""Per-layer report (scale, fix_point, saturation, SQNR vs FP32) and the quant-report command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pipeline_support import tiny_artifact_path
from quant_support import concat_model, patterns

from edgeptycho.quantization.report import layer_report, layer_table
from edgeptycho.quantization.schemes import quantize_model


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    d = tmp_path_factory.mktemp("layers")
    src = concat_model(d / "c.onnx")
    cal, x = patterns(48, 32, seed=1), patterns(6, 32, seed=8)
    out = {}
    for scheme in ("dpu-pow2", "trt-int8", "fp16"):
        dst = d / f"{scheme}.onnx"
        quantize_model(src, dst, scheme, cal if scheme != "fp16" else None)
        out[scheme] = layer_report(src, dst, scheme, x, batch=4)
    return out


def test_dpu_rows_carry_pow2_scales_saturation_and_sqnr(reports):
    rows = reports["dpu-pow2"]
    assert rows[0]["op"] == "input" and {r["op"] for r in rows} >= {"conv+relu", "concat", "resize", "add+relu",
                                                                    "convtranspose+relu", "conv"}
    for r in rows:
        assert r["scale"] == 2.0 ** -r["fix_point"]
        assert 0.0 <= r["saturation"] < 0.05
        assert math.isfinite(r["sqnr_db"]) and r["sqnr_db"] > 5
    # the input is one rounding of log-scaled data: near the 8-bit uniform-noise figure, far above the tail
    assert rows[0]["sqnr_db"] > 25 and rows[0]["sqnr_db"] > rows[-1]["sqnr_db"]
    assert "| 0 | `diffraction` | input |" in layer_table(rows)


def test_fp16_is_far_cleaner_than_int8_and_trt_leaves_some_tensors_float(reports):
    fp16 = {r["tensor"]: r["sqnr_db"] for r in reports["fp16"]}
    for r in reports["dpu-pow2"]:
        assert fp16[r["tensor"]] > r["sqnr_db"] + 15
    trt = reports["trt-int8"]
    assert any(r["scale"] is None for r in trt) and any(r["scale"] for r in trt)
    assert all(r["fix_point"] is None for r in trt)


@pytest.mark.slow
def test_quant_report_writes_markdown_plots_and_metrics(tmp_path, tmp_path_factory, capsys):
    from edgeptycho.cli import main

    model = tiny_artifact_path(tmp_path_factory)
    out = tmp_path / "report"
    assert main(["quant-report", "--model", str(model), "--out", str(out), "--n-cal", "32", "--positions", "16",
                 "--layer-patterns", "8", "--no-progress"]) == 0
    assert "fp16" in capsys.readouterr().out
    for f in ("report.md", "metrics.png", "phase_error_maps.png", "layer_sqnr.png", "metrics.json"):
        assert (out / f).stat().st_size > 0, f
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["scans"]) == {"siemens-star", "ic", "cells", "texture"}
    for row in m["scans"].values():
        assert set(row) == {"fp32", "fp16", "trt-int8", "dpu-pow2"}
        assert np.isfinite(row["dpu-pow2"]["phase_nrmse"]) and row["dpu-pow2"]["frc_nm"] > 0
    assert m["aggregate"]["fp16"]["met"]  # FP16 is within 0.001 of FP32 even for random weights
    assert m["dpu_vs_ort"]["first"]["max_lsb"] <= 1
    md = (out / "report.md").read_text()
    assert "## Per-layer SQNR" in md and "DPU emulator vs ONNX Runtime" in md
    for scheme in ("fp16", "trt-int8", "dpu-pow2"):
        assert (out / "models" / f"{m['model']['name']}-{scheme}.json").is_file()
