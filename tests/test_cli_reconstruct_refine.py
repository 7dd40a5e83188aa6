"""`edgeptycho reconstruct --model none --refine-iters N`: the iterative path writes a scoreable reconstruction."""

from __future__ import annotations

import numpy as np

from edgeptycho.cli import main
from edgeptycho.io.cxi import read_reconstruction, read_scan
from edgeptycho.physics import metrics


def test_iterative_only_reconstruction_improves_with_iterations(tmp_path):
    scan_path = tmp_path / "scan.cxi"
    assert main(["simulate", "--preset", "small", "--seed", "5", "--out", str(scan_path), "--no-progress"]) == 0
    scan = read_scan(scan_path)
    scores = {}
    for iters in (2, 30):
        out = tmp_path / f"r{iters}.cxi"
        assert main(["reconstruct", str(scan_path), "--model", "none", "--refine-iters", str(iters),
                     "--out", str(out)]) == 0
        recon = read_reconstruction(out)
        assert np.isfinite(recon.object).all()
        assert recon.convergence is not None and len(recon.convergence) == iters
        scores[iters] = metrics.evaluate(recon, scan)["phase_nrmse"]
    assert scores[30] < 0.5 * scores[2]
    assert scores[30] < 0.15


def test_negative_iterations_are_refused(tmp_path, capsys):
    scan_path = tmp_path / "scan.cxi"
    main(["simulate", "--preset", "small", "--seed", "5", "--out", str(scan_path), "--no-progress"])
    assert main(["reconstruct", str(scan_path), "--model", "none", "--refine-iters", "-1",
                 "--out", str(tmp_path / "r.cxi")]) == 1
    assert "--refine-iters" in capsys.readouterr().err


def test_refinement_shows_a_progress_bar_unless_told_not_to(tmp_path, capsys):
    scan_path = tmp_path / "scan.cxi"
    main(["simulate", "--preset", "small", "--seed", "5", "--out", str(scan_path), "--no-progress"])
    capsys.readouterr()
    assert main(["reconstruct", str(scan_path), "--model", "none", "--refine-iters", "3",
                 "--out", str(tmp_path / "a.cxi")]) == 0
    err = capsys.readouterr().err
    assert "refine" in err and "/3 " in err  # tqdm redraws at most every 0.1 s: the count may still be 0
    assert main(["reconstruct", str(scan_path), "--model", "none", "--refine-iters", "3", "--no-progress",
                 "--out", str(tmp_path / "b.cxi")]) == 0
    assert "refine" not in capsys.readouterr().err
