"""`edgeptycho demo`: a small scan streamed end to end produces figures, a CXI file and scores."""

from __future__ import annotations

import json

import pytest
from pipeline_support import tiny_artifact_path

from edgeptycho.cli import main


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    return tiny_artifact_path(tmp_path_factory)


def test_demo_streams_scores_and_writes_everything(tiny_artifact, tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--model", str(tiny_artifact), "--preset", "small", "--positions", "40", "--batch", "8",
               "--out", str(out), "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    for name in ("phase.png", "amplitude.png", "comparison.png", "result.cxi"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert res["patterns"] == 40 and res["published"] == 40 and res["dropped"] == 0
    assert res["subscriber"]["unique_frame_ids"] == 40
    assert res["copies_per_frame"] == 1.0
    assert 0 <= res["phase_nrmse"] < 10 and 0 <= res["complex_nrmse"] <= 2
    assert res["throughput_patterns_per_s"] > 0 and res["latency_ms"]["p99"] >= res["latency_ms"]["p50"]


def test_demo_refuses_a_model_that_does_not_fit_the_preset(tiny_artifact, tmp_path):
    with pytest.raises(ValueError, match="pick a matching --preset"):
        from edgeptycho.commands import demo

        parser = __import__("argparse").ArgumentParser()
        demo.add_arguments(parser)
        demo.run(parser.parse_args(["--model", str(tiny_artifact), "--out", str(tmp_path)]))
