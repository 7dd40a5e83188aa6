"""`edgeptycho demo`: simulate a Siemens-star scan, stream it through the service on the CPU, show and score it."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="out/demo", help="folder for phase.png, amplitude.png, "
                        "comparison.png, result.cxi (default: out/demo)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--positions", type=int, help="scan positions (default: the preset's 1000)")
    parser.add_argument("--model", default="default", help="zoo name or .onnx path (default: default)")
    parser.add_argument("--preset", default="siemens-star", help="simulation preset (default: siemens-star)")
    parser.add_argument("--batch", type=int, default=32, help="inference batch (default: 32)")
    parser.add_argument("--seed", type=int, default=0, help="simulation seed")
    parser.add_argument("--rate", type=float, help="pace the detector at this many patterns/s (default: as "
                        "fast as the service takes them); paced frames carry detector timestamps")


class _Counter:
    """Subscriber thread: counts results-stream messages by topic and patch frame ids."""

    def __init__(self, endpoint: str):
        from edgeptycho.stream.publish import Subscriber

        self.sub = Subscriber(endpoint, rcvhwm=100_000)
        self.counts: dict[str, int] = {"patch": 0, "mosaic": 0, "status": 0}
        self.ids: set[int] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="demo-subscriber", daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            msg = self.sub.recv(timeout=0.05)
            if msg is None:
                continue
            self.counts[msg.topic] += 1
            if msg.topic == "patch":
                self.ids.add(int(msg.header["frame_id"]))

    def settle(self, n_expected: int, timeout: float = 3.0) -> None:
        """Wait until every patch arrived (or timeout), then stop."""
        deadline = time.monotonic() + timeout
        while len(self.ids) < n_expected and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)  # the final status and mosaic follow the last patch
        self.stop.set()
        self.thread.join()
        self.sub.close()


def run(args: argparse.Namespace) -> int:
    from edgeptycho.hw.registry import open_backend
    from edgeptycho.model.artifact import ModelArtifact
    from edgeptycho.physics.metrics import evaluate
    from edgeptycho.physics.simulate import preset, simulate
    from edgeptycho.pipeline.runner import BatcherConfig, OutputConfig, Pipeline, ScanInfo
    from edgeptycho.stream.publish import Publisher
    from edgeptycho.stream.ring import RingConfig
    from edgeptycho.stream.sources.replay import ArraySource

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    art = ModelArtifact.load(args.model)
    spec = preset(args.preset)
    if args.positions:
        spec = spec.replace(scan={"n_positions": int(args.positions)})
    frame = int(art.metadata.get("frame_size") or art.input_size * art.preprocess.bin)
    if spec.geometry.frame_size != frame:
        raise ValueError(f"model '{art.name}' takes {frame}-px frames but preset '{args.preset}' simulates "
                         f"{spec.geometry.frame_size}-px frames; pick a matching --preset (e.g. 'small' for tiny)")
    say(f"simulating {spec.scan.n_positions} patterns ({args.preset}, {frame}x{frame})...")
    t = time.perf_counter()
    scan = simulate(spec, seed=args.seed)
    t_sim = time.perf_counter() - t

    backend = open_backend("cpu", art.path, args.batch)
    publisher = Publisher("tcp://127.0.0.1:*", sndhwm=100_000)
    counter = _Counter(publisher.endpoint)
    counter.thread.start()
    time.sleep(0.2)  # let the subscription reach the publisher (ZeroMQ's slow-joiner)
    source = ArraySource.from_scan(scan, rate_hz=args.rate)
    pipe = Pipeline(source, backend, art.preprocess, art.output_size, RingConfig(slots=2 * args.batch),
                    scan=ScanInfo.from_scan(scan), publisher=publisher, batcher=BatcherConfig(),
                    output=OutputConfig(cxi=str(out / "result.cxi")), model_info=art.metadata,
                    scan_id=f"demo-{args.preset}-{args.seed}")
    say(f"streaming through {backend.name} ({art.name}, batch {args.batch}) → {publisher.endpoint} ...")
    try:
        report = pipe.run(timeout=600)
    finally:
        counter.settle(scan.n_frames)
        publisher.close()
        backend.close()
    if 0 not in pipe.results:
        raise RuntimeError(f"no reconstruction was produced: {report['errors']}")
    recon = pipe.reconstruction(None, pipe.results[0])
    recon.positions_m = scan.positions_m
    scores = evaluate(recon, scan)
    save_figures(out, recon, scan, art.name)
    lat = report["latency_ms"]
    # Paced frames carry the detector's (scheduled) time; at max rate the ring commit is the earliest stamp.
    key = "detector_to_published" if lat["detector_to_published"]["count"] else "receive_to_published"
    result = {
        "model": art.name, "model_sha256": art.sha256, "backend": backend.name, "batch": args.batch,
        "patterns": scan.n_frames, "simulate_s": round(t_sim, 2),
        "throughput_patterns_per_s": round(report["throughput_hz"], 1),
        "latency_ms": {"from": key.split("_to_")[0], "p50": lat[key]["p50"], "p99": lat[key]["p99"],
                       "overhead_p99": lat["overhead"]["p99"]},
        "rate_hz": args.rate,
        "dropped": report["dropped"], "published": report["frames_published"],
        "subscriber": {"patches": counter.counts["patch"], "unique_frame_ids": len(counter.ids),
                       "mosaics": counter.counts["mosaic"], "status": counter.counts["status"]},
        "copies_per_frame": report["copies_per_frame"]["slot_to_input"],
        "phase_nrmse": scores["phase_nrmse"], "complex_nrmse": scores["complex_nrmse"],
        "frc_half_pitch_m": scores["frc_half_pitch_m"], "metrics": scores,
        "files": sorted(str(p) for p in out.iterdir() if p.suffix in (".png", ".cxi")),
        "total_s": round(time.perf_counter() - t0, 1),
    }
    if args.json:
        print(json.dumps(result, indent=2, default=float))
    else:
        print(f"throughput: {result['throughput_patterns_per_s']} patterns/s "
              f"(streamed, {art.name} on {backend.name}, batch {args.batch})")
        where = ("detector→publish" if key.startswith("detector") else
                 "ring→publish (at max rate: includes frames queued for the backend)")
        lat_ms = result["latency_ms"]
        print(f"latency {where}: p50 {lat_ms['p50']:.1f} ms, p99 {lat_ms['p99']:.1f} ms; "
              f"pipeline overhead p99 {lat_ms['overhead_p99']:.2f} ms")
        print(f"dropped: {result['dropped']}; subscriber received {counter.counts['patch']} patches "
              f"({len(counter.ids)} unique of {scan.n_frames}), {counter.counts['mosaic']} mosaics")
        print(f"phase NRMSE {scores['phase_nrmse']:.4f}, complex NRMSE {scores['complex_nrmse']:.4f}, "
              f"FRC half-pitch {scores['frc_half_pitch_m'] * 1e9:.1f} nm")
        print(f"wrote {', '.join(result['files'])} in {result['total_s']} s")
    return 0


def _scale_bar(ax: Any, pixel_m: float, width_px: int) -> None:
    """A white bar of a round length (about a fifth of the image) in the lower left corner."""
    target = width_px * pixel_m / 5
    length = 10 ** np.floor(np.log10(target))
    for mult in (5, 2, 1):
        if mult * length <= target:
            length *= mult
            break
    px = length / pixel_m
    label = f"{length * 1e6:g} µm" if length >= 1e-6 else f"{length * 1e9:g} nm"
    x0, y0 = 0.05 * width_px, 0.92 * ax.get_ylim()[0]
    ax.plot([x0, x0 + px], [y0, y0], color="white", linewidth=3)
    ax.text(x0 + px / 2, y0 - 0.02 * width_px, label, color="white", ha="center", va="bottom", fontsize=8)


def save_figures(out: Path, recon: Any, scan: Any, model_name: str) -> None:
    """phase.png, amplitude.png (colourbars, scale bar, pixel size) and comparison.png beside the truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgeptycho.physics.metrics import align_phase, illuminated_mask

    obj = np.asarray(recon.object)
    pixel = float(recon.pixel_m)
    origin = np.rint(np.asarray(recon.origin_m) / pixel).astype(int)
    mask = illuminated_mask(obj.shape, scan.probe, scan.positions_px() - origin)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    crop = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    truth = None
    if scan.object_truth is not None:
        t = np.asarray(scan.object_truth)
        r0, c0 = origin
        if r0 >= 0 and c0 >= 0 and r0 + obj.shape[0] <= t.shape[0] and c0 + obj.shape[1] <= t.shape[1]:
            truth = t[r0:r0 + obj.shape[0], c0:c0 + obj.shape[1]][crop]
    x, m = obj[crop], mask[crop]
    phase = align_phase(x, truth, m) if truth is not None else np.angle(x)
    c = np.vdot(x[m], truth[m]) / max(np.vdot(x[m], x[m]).real, 1e-30) if truth is not None else 1.0
    amp = np.abs(c * x)
    phase = np.where(m, phase, np.nan)
    amp = np.where(m, amp, np.nan)
    title = f"{model_name} CNN, streamed + stitched; pixel {pixel * 1e9:.1f} nm"
    for name, img, cmap, unit in (("phase", phase, "viridis", "rad"), ("amplitude", amp, "gray", "")):
        fig, ax = plt.subplots(figsize=(6, 5.4))
        ax.set_facecolor("black")  # unilluminated pixels are NaN: black, so the white scale bar shows
        im = ax.imshow(img, cmap=cmap)
        fig.colorbar(im, ax=ax, label=f"{name} ({unit})" if unit else name)
        _scale_bar(ax, pixel, img.shape[1])
        ax.set_title(f"{name}\n{title}", fontsize=9)
        ax.set_axis_off()
        fig.savefig(out / f"{name}.png", dpi=120, bbox_inches="tight")
        plt.close(fig)
    if truth is not None:
        fig, axes = plt.subplots(2, 2, figsize=(10, 9))
        t_phase = np.where(m, np.angle(truth), np.nan)
        t_amp = np.where(m, np.abs(truth), np.nan)
        for ax, img, cmap, label in ((axes[0, 0], t_phase, "viridis", "truth phase (rad)"),
                                     (axes[0, 1], phase, "viridis", "CNN + stitch phase (rad)"),
                                     (axes[1, 0], t_amp, "gray", "truth amplitude"),
                                     (axes[1, 1], amp, "gray", "CNN + stitch amplitude")):
            vmin, vmax = (np.nanmin(t_phase), np.nanmax(t_phase)) if "phase" in label else (None, None)
            ax.set_facecolor("black")
            im = ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax)
            fig.colorbar(im, ax=ax, shrink=0.8)
            _scale_bar(ax, pixel, img.shape[1])
            ax.set_title(label, fontsize=9)
            ax.set_axis_off()
        fig.suptitle(f"ground truth vs {title}", fontsize=10)
        fig.savefig(out / "comparison.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
