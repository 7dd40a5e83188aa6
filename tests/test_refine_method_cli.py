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


def test_threads_reach_the_refinements_fft_workers(tmp_path, monkeypatch):
    """`--threads 1` on a shared machine must hold the solver to one core too, not only the backend."""
    from edgeptycho.physics import xp

    seen: list[int] = []
    real = xp.get_backend

    def spy(name="numpy", device=None, workers=-1):
        seen.append(workers)
        return real(name, device, workers)

    monkeypatch.setattr("edgeptycho.physics.epie.get_backend", spy)
    scan_path = tmp_path / "scan.cxi"
    assert main(["simulate", "--preset", "small", "--seed", "6", "--out", str(scan_path), "--no-progress"]) == 0
    assert main(["reconstruct", str(scan_path), "--model", "none", "--refine-iters", "2", "--threads", "1",
                 "--out", str(tmp_path / "r.cxi")]) == 0
    assert seen == [1]
