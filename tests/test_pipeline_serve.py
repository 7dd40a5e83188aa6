"""`edgeptycho serve`: YAML validation, array/replay sources end to end, clean shutdown on SIGINT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from pipeline_support import small_scan, tiny_artifact_path

from edgeptycho.cli import main
from edgeptycho.config import ConfigError
from edgeptycho.pipeline.runner import ServeConfig


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    return tiny_artifact_path(tmp_path_factory)


def _write(tmp_path, cfg: dict) -> str:
    p = tmp_path / "serve.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


@pytest.mark.parametrize("cfg, key", [
    ({"ring": {"polcy": "drop"}}, "ring.polcy"),
    ({"ring": {"policy": "sometimes"}}, "ring"),
    ({"source": {"kind": "replay"}}, "source"),
    ({"backend": {"batch": "many"}}, "backend.batch"),
    ({"source": {"kind": "carrier-pigeon"}}, "source.kind"),
    ({"nice": 25}, "nice"),
])
def test_bad_settings_name_the_key(tmp_path, cfg, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        ServeConfig.load(_write(tmp_path, cfg))


def test_example_config_is_valid():
    root = os.path.dirname(os.path.dirname(__file__))
    cfg = ServeConfig.load(os.path.join(root, "configs", "serve.yaml"))
    assert cfg.source.kind == "replay" and cfg.publish.endpoint.startswith("tcp://127.0.0.1:")


def _base(tiny_artifact, tmp_path, source: dict) -> dict:
    return {"source": source, "model": str(tiny_artifact), "backend": {"batch": 8, "threads": 1},
            "publish": {"endpoint": "tcp://127.0.0.1:*"}, "output": {"cxi": str(tmp_path / "out.cxi")},
            "ring": {"slots": 16}}


def test_serve_an_npz_array_to_the_end(tiny_artifact, tmp_path, capsys):
    scan = small_scan(30)
    npz = tmp_path / "scan.npz"
    np.savez(npz, frames=scan.frames, positions_m=scan.positions_m, pixel_m=scan.object_pixel_m, probe=scan.probe)
    rc = main(["serve", "--config", _write(tmp_path, _base(tiny_artifact, tmp_path, {"kind": "array",
                                                                                      "path": str(npz)})), "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["frames_published"] == 30 and report["dropped"] == 0
    assert report["written"] == [str(tmp_path / "out.cxi")] and (tmp_path / "out.cxi").is_file()


def test_serve_replays_a_cxi_scan(tiny_artifact, tmp_path, capsys):
    from edgeptycho.io.cxi import read_reconstruction, write_scan

    scan = small_scan(25)
    write_scan(tmp_path / "scan.cxi", scan)
    cfg = _base(tiny_artifact, tmp_path, {"kind": "replay", "path": str(tmp_path / "scan.cxi"), "rate_hz": 2000})
    assert main(["serve", "--config", _write(tmp_path, cfg), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["frames_published"] == 25
    recon = read_reconstruction(tmp_path / "out.cxi")
    assert recon.pixel_m == pytest.approx(scan.object_pixel_m)


@pytest.mark.parametrize("backend", [{"threads": 1}, {"threads": 2, "workers": 2}], ids=["one-session", "two-sessions"])
def test_sigint_drains_and_exits_cleanly(tiny_artifact, tmp_path, backend):
    """A live (tcp) source never ends by itself: SIGINT stops it, the service flushes and reports (also with
    the cpu backend's parallel sessions, whose batches complete on the pipeline's waiter thread)."""
    from edgeptycho.stream.sources.tcp import TcpSender

    cfg = _base(tiny_artifact, tmp_path, {"kind": "tcp", "endpoint": "tcp://127.0.0.1:0"})
    cfg["backend"].update(backend)
    cfg["source"]["endpoint"] = "tcp://127.0.0.1:0"
    proc = subprocess.Popen([sys.executable, "-m", "edgeptycho.cli", "serve", "--config", _write(tmp_path, cfg),
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 60
        while "listening on" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
        port = int(line.rsplit(":", 1)[1])
        scan = small_scan(12)
        sender = TcpSender("127.0.0.1", port, scan.frames.shape[1:], scan.frames.dtype)
        for i, f in enumerate(scan.frames):
            slot = sender.acquire_write()
            sender.slot_view(slot)[...] = f
            sender.commit(slot, i, position_px=tuple(scan.positions_px()[i]))
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert report["frames_received"] == report["frames_published"] == 12


def test_serve_a_dectris_stream_with_mask_and_positions(tiny_artifact, tmp_path):
    """SIMPLON stream v2 from the detector simulator: frames decoded into the ring, positions from the scan
    file, the detector's pixel mask applied before preprocessing."""
    pytest.importorskip("cbor2")
    from edgeptycho.commands.serve import build_pipeline
    from edgeptycho.io.cxi import write_scan
    from edgeptycho.stream.detector_sim import DetectorSimulator

    scan = small_scan(20)
    write_scan(tmp_path / "scan.cxi", scan)
    mask = np.zeros(scan.frames.shape[1:], np.uint32)
    mask[0, :] = 1  # a bad row
    sim = DetectorSimulator(scan.frames.astype(np.uint32), endpoint="tcp://127.0.0.1:0", mask=mask)
    endpoint = sim.bind()
    cfg = ServeConfig.load(_write(tmp_path, {
        **_base(tiny_artifact, tmp_path, {"kind": "dectris-v2", "endpoint": endpoint, "dtype": "uint32",
                                          "positions": str(tmp_path / "scan.cxi")}),
        "publish": {"enabled": False}}))
    pipe = build_pipeline(cfg)
    try:
        pipe.start()
        sim.send_series()
        time.sleep(0.5)
        pipe.stop()
        assert pipe.wait(30)
    finally:
        sim.close()
        pipe.backend.close()
    rep = pipe.report()
    assert rep["frames_published"] == 20 and rep["dropped"] == 0
    assert pipe.post.counters["unplaced"] == 0  # every frame got its position from the table
    np.testing.assert_array_equal(pipe.batcher.mask_of(1), mask)  # the simulator's first series is 1
