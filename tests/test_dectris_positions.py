"""Positions joined to frames by frame id: scan plan, files, and a live ZeroMQ feed."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from edgeptycho.stream.positions import PositionTable, ZmqPositionFeed


def test_scan_plan_in_pixels_and_metres():
    plan = np.array([[10.0, 20.0], [30.0, 40.0]])
    t = PositionTable.from_array(plan, units="px", pixel_m=1e-8)
    px, m = t.get(1)
    assert px == pytest.approx((30, 40)) and m == pytest.approx((3e-7, 4e-7))
    assert all(np.isnan(v) for v in t.get(2)[1])  # unknown frame: NaN, not an error
    lpx, lm = t.lookup([0, 5, -1])
    np.testing.assert_allclose(lpx[0], [10, 20])
    assert np.isnan(lm[1:]).all()
    with pytest.raises(ValueError, match="pixel_m"):
        PositionTable.from_array(plan, units="px")


def test_files(tmp_path):
    pos = np.array([[1e-6, 2e-6], [3e-6, 4e-6], [5e-6, 6e-6]])
    np.save(tmp_path / "p.npy", pos)
    np.savetxt(tmp_path / "p.txt", pos)
    (tmp_path / "p.csv").write_text("# frame_id, y, x\n2,5e-6,6e-6\n0,1e-6,2e-6\n")
    for name in ("p.npy", "p.txt"):
        np.testing.assert_allclose(PositionTable.from_file(tmp_path / name).lookup([0, 1, 2])[1], pos)
    sparse = PositionTable.from_file(tmp_path / "p.csv")
    assert len(sparse) == 2 and np.isnan(sparse.get(1)[1][0])
    np.testing.assert_allclose(sparse.get(2)[1], pos[2])
    with pytest.raises(FileNotFoundError):
        PositionTable.from_file(tmp_path / "missing.npy")


def test_cxi_scan_positions(tmp_path):
    from edgeptycho.io.cxi import write_scan
    from edgeptycho.physics.types import ScanData

    pos = np.array([[1e-7, 2e-7], [3e-7, 4e-7]])
    scan = ScanData(frames=np.zeros((2, 16, 16), np.float32), positions_m=pos, energy_J=1.6e-15,
                    distance_m=1.0, detector_pixel_m=75e-6)
    write_scan(tmp_path / "s.cxi", scan)
    t = PositionTable.from_file(tmp_path / "s.cxi")
    np.testing.assert_allclose(t.lookup([0, 1])[1], pos)
    np.testing.assert_allclose(t.get(1)[0], pos[1] / scan.object_pixel_m)


def test_zmq_feed_fills_the_table_and_skips_garbage():
    zmq = pytest.importorskip("zmq")
    pub = zmq.Context.instance().socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    table = PositionTable(pixel_m=1e-8)
    feed = ZmqPositionFeed(table, f"tcp://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 10
        while len(table) < 3 and time.monotonic() < deadline:  # PUB drops until the SUB has joined
            pub.send(json.dumps({"frame_id": 0, "position_m": [1e-6, 2e-6]}).encode())
            pub.send(b"\x00garbage")
            pub.send(json.dumps({"frame_ids": [1, 2], "positions_px": [[10, 20], [30, 40]]}).encode())
            time.sleep(0.05)
        assert len(table) == 3 and feed.malformed >= 1
        np.testing.assert_allclose(table.get(2)[1], [3e-7, 4e-7])
    finally:
        feed.close()
        pub.close(0)
