"""`reconstruct --refine-method`: the chosen iterative algorithm runs and is recorded in the output file."""

from __future__ import annotations

from edgeptycho.cli import main
from edgeptycho.io.cxi import read_reconstruction


def test_refine_method_is_applied_and_recorded(tmp_path):
    scan_path = tmp_path / "scan.cxi"
    assert main(["simulate", "--preset", "small", "--seed", "6", "--out", str(scan_path), "--no-progress"]) == 0
    for method in ("rpie", None):
        out = tmp_path / f"{method}.cxi"
        extra = ["--refine-method", method] if method else []
        assert main(["reconstruct", str(scan_path), "--model", "none", "--refine-iters", "3", *extra,
                     "--out", str(out)]) == 0
        assert read_reconstruction(out).program["method"] == (method or "mpie")
