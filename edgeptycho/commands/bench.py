"""`edgeptycho bench pipeline|simulate`: bare backend vs streamed throughput, latency per stage, copies."""

from __future__ import annotations

import argparse
import json
import runpy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=["pipeline", "simulate"], help="which benchmark")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    parser.add_argument("--model", default="default", help="zoo name or .onnx path (pipeline)")
    parser.add_argument("--backend", default="cpu", help="HAL backend (pipeline; default cpu)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (pipeline)")
    parser.add_argument("--frames", type=int, default=1024, help="frames per streamed run (pipeline)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved bare/streamed rounds (pipeline)")
    parser.add_argument("--threads", type=int, help="cpu backend cores (default: physical cores)")
    parser.add_argument("--workers", type=int,
                        help="cpu backend sessions running batches at once (default: 2 where threads >= 2)")
    parser.add_argument("--nice", type=int, default=0, help="niceness of the pipeline's helper threads (serve's `nice`)")
    parser.add_argument("--switch-interval-ms", type=_switch_ms, default=None, metavar="MS",
                        help="GIL switch interval while streaming (serve's `switch_interval_ms`; default "
                             "the service's; 'none' keeps the interpreter's 5 ms)")
    parser.add_argument("--preset", default="siemens-star", help="simulation preset (simulate)")
    parser.add_argument("--positions", type=int, default=1000, help="scan positions (simulate)")


class Bench:
    """Everything one pipeline benchmark shares: model, backend, frames with positions, the probe."""

    def __init__(self, model: str, backend: str = "cpu", batch: int = 32, frames: int = 1024,
                 threads: int | None = None, workers: int | None = None):
        from edgeptycho.hw.registry import open_backend
        from edgeptycho.model.artifact import ModelArtifact
        from edgeptycho.physics.simulate import preset, simulate

        self.art = ModelArtifact.load(model)
        size = int(self.art.metadata.get("frame_size") or self.art.input_size * self.art.preprocess.bin)
        name = "siemens-star" if size == 256 else "small"
        spec = preset(name)
        if spec.geometry.frame_size != size:
            raise ValueError(f"no simulation preset makes {size}-px frames for model '{self.art.name}'")
        # Inference time does not depend on the pattern, so a short scan is simulated and tiled to `frames`.
        self.scan = simulate(spec.replace(scan={"n_positions": min(frames, 256)}), seed=0)
        reps = -(-frames // self.scan.n_frames)
        self.frames = np.tile(self.scan.frames, (reps, 1, 1))[:frames]
        self.positions_px = np.tile(self.scan.positions_px(), (reps, 1))[:frames]
        self.positions_m = self.positions_px * self.scan.object_pixel_m
        opts = {k: v for k, v in (("threads", threads), ("workers", workers)) if v}
        self.backend = open_backend(backend, self.art.path, batch, **opts)
        self.batch = batch
        self._pub: Any = None

    def bare(self, seconds: float = 2.0) -> float:
        """Patterns/s of backend.submit/wait on one preprocessed full batch, in a loop (double-buffered)."""
        from edgeptycho.model.preprocess import preprocess_into

        be = self.backend
        alloc = be.allocator()
        x = [alloc.empty(be.input_spec.shape, be.input_spec.dtype) for _ in range(2)]
        outs = [be.new_outputs(alloc) for _ in range(2)]
        for xi in x:
            preprocess_into(self.frames[: self.batch], xi, self.art.preprocess, scale=be.input_spec.scale)
        be.wait(be.submit(x[0], outs[0]))  # warm-up
        n, k, t0, c0 = 0, 0, time.perf_counter(), time.process_time()
        ticket = be.submit(x[0], outs[0])
        while time.perf_counter() - t0 < seconds:
            k ^= 1
            nxt = be.submit(x[k], outs[k])
            be.wait(ticket)
            ticket, n = nxt, n + self.batch
        be.wait(ticket)
        n += self.batch
        self.bare_cpu_us = 1e6 * (time.process_time() - c0) / n  # all threads of the process, per frame
        return n / (time.perf_counter() - t0)

    def setup(self) -> dict[str, Any]:
        """What bare and streamed share (one backend object): model, batch, intra-op threads, preprocessing."""
        return {"model": self.art.name, "model_sha256": str(self.art.metadata.get("sha256", "")),
                "batch": int(self.backend.input_spec.shape[0]), "threads": getattr(self.backend, "threads", None),
                "workers": getattr(self.backend, "workers", None),
                "preprocess": repr(self.art.preprocess)}

    def _consumer(self) -> tuple[Any, Any]:
        """The publisher and a subscriber in another process (a consumer's CPU is not the service's)."""
        if self._pub is None:
            import multiprocessing

            from edgeptycho.stream.publish import Publisher

            self._pub = Publisher("tcp://127.0.0.1:*", sndhwm=1000, count_drops=False)
            ctx = multiprocessing.get_context("spawn")  # fork would copy this process's threads
            self._conn, child = ctx.Pipe()
            self._proc = ctx.Process(target=_subscriber_main, args=(self._pub.endpoint, child), daemon=True)
            self._proc.start()
            self._sub_cpu = self._answer()  # subscribed; its CPU seconds so far
            time.sleep(0.3)  # ZeroMQ slow joiner: the subscription must reach the publisher
        return self._pub, self._conn

    def _answer(self, timeout: float = 60.0) -> Any:
        """The subscriber process's next reply; an error, not a hang, if it died or went silent."""
        if not self._conn.poll(timeout):
            alive = self._proc.is_alive()
            raise RuntimeError(f"bench subscriber process {'silent' if alive else 'died'} (exit {self._proc.exitcode})")
        return self._conn.recv()

    def streamed(self, rate_hz: float | None = None, policy: str = "backpressure", slots: int | None = None,
                 stalled_subscriber: bool = False, max_wait_ms: float = 5.0, nice: int = 0,
                 switch_interval_ms: Any = "default") -> dict[str, Any]:
        """One pass of every frame through the whole service (ArraySource → … → PUB, live stitch).

        The patches go to a subscriber process that returns the frame ids it got; `stalled_subscriber`
        instead connects one that never reads (its queues fill at the high-water mark).
        `switch_interval_ms`: "default" = the service's default, None = the interpreter's own setting.
        """
        from edgeptycho.pipeline.runner import DEFAULT_SWITCH_MS, BatcherConfig, Pipeline, ScanInfo
        from edgeptycho.stream.publish import Publisher, Subscriber
        from edgeptycho.stream.ring import RingConfig
        from edgeptycho.stream.sources.replay import ArraySource

        if stalled_subscriber:
            pub = Publisher("tcp://127.0.0.1:*", sndhwm=1000, count_drops=True)
            stalled = Subscriber(pub.endpoint, topics=["patch"], rcvhwm=1)
            time.sleep(0.3)
        else:
            pub, conn = self._consumer()
        src = ArraySource(self.frames, self.positions_px, self.positions_m, rate_hz=rate_hz)
        info = ScanInfo(self.positions_px, self.scan.object_pixel_m, self.scan.probe)
        pipe = Pipeline(src, self.backend, self.art.preprocess, self.art.output_size,
                        RingConfig(slots=slots or 4 * self.batch, policy=policy), scan=info, publisher=pub,
                        batcher=BatcherConfig(max_wait_ms=max_wait_ms), model_info=self.art.metadata, nice=nice,
                        switch_interval_ms=DEFAULT_SWITCH_MS if switch_interval_ms == "default" else switch_interval_ms)
        try:
            c0 = time.process_time()
            pipe.start(warmup=False)  # bare() warmed the backend; a warm-up batch would bias the CPU figure
            if not pipe.wait(600):
                pipe.stop(hard=True)
                raise TimeoutError("streamed run did not finish in 600 s")
            rep = pipe.report()
            c1 = time.process_time()
        finally:
            if stalled_subscriber:
                stalled.close()
                pub.close()
        ids: list[int] = []
        if not stalled_subscriber:
            conn.send(rep["frames_published"])  # the consumer answers once it has them all (or 5 s passed)
            ids, sub_cpu = self._answer()
            # the consumer shares this host's cores: its CPU is reported, not hidden (a beamline's consumers
            # usually run on another machine)
            rep["subscriber_cpu_us_per_frame"] = 1e6 * (sub_cpu - self._sub_cpu) / max(rep["frames_published"], 1)
            self._sub_cpu = sub_cpu
        # Process CPU per frame of the service, all threads, until the last patch went out: the end-of-scan
        # offline stitch that follows is a per-scan, not a per-frame, cost.
        c1 = pipe.process_cpu_at_end.get("post", c1)
        rep["process_cpu_us_per_frame"] = 1e6 * (c1 - c0) / max(rep["frames_published"], 1)
        rep["subscriber_ids"] = ids
        rep["lost_id_set"] = pipe.ring.lost_ids().tolist()
        return rep

    def close(self) -> None:
        if self._pub is not None:
            self._conn.send(None)
            self._proc.join(5)
            self._pub.close()
            self._pub = None
        self.backend.close()


def _subscriber_main(endpoint: str, conn: Any) -> None:
    """Subscriber process: collect patch frame ids; on a count from the parent, send them when all arrived."""
    from edgeptycho.stream.publish import Subscriber

    sub = Subscriber(endpoint, topics=["patch"], rcvhwm=1_000_000)
    conn.send(time.process_time())  # ready
    ids: list[int] = []
    while True:
        if conn.poll():
            want = conn.recv()
            if want is None:
                break
            deadline = time.monotonic() + 5.0
            while len(ids) < want and time.monotonic() < deadline:
                msg = sub.recv(timeout=0.05)
                if msg is not None:
                    ids.append(int(msg.header["frame_id"]))
            conn.send((ids, time.process_time()))
            ids = []
        msg = sub.recv(timeout=0.01)
        if msg is not None:
            ids.append(int(msg.header["frame_id"]))
    sub.close()


def _lat(rep: dict[str, Any]) -> dict[str, Any]:
    keep = ("receive_to_batched", "batched_to_inferred", "inferred_to_published", "receive_to_published",
            "overhead")
    return {k: {"p50": rep["latency_ms"][k]["p50"], "p99": rep["latency_ms"][k]["p99"]} for k in keep}


def _switch_ms(text: str) -> Any:
    """--switch-interval-ms: a number of ms, or 'none' (keep the interpreter's setting)."""
    if text.lower() in ("none", "null", "off"):
        return "none"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected milliseconds or 'none', got {text!r}") from None


def bench_pipeline(model: str, backend: str = "cpu", batch: int = 32, frames: int = 1024, repeats: int = 3,
                   threads: int | None = None, nice: int = 0, switch_interval_ms: Any = "default",
                   workers: int | None = None) -> dict[str, Any]:
    """Bare vs streamed throughput in interleaved rounds (median ratio), then latencies at 60 and 90 % load.

    Both sides use the one backend object (same model file, batch, intra-op threads) and the model's own
    preprocessing; bare runs on frames preprocessed once, so it is the backend alone.
    """
    from edgeptycho.pipeline.runner import DEFAULT_SWITCH_MS

    sw = None if switch_interval_ms == "none" else switch_interval_ms
    b = Bench(model, backend, batch, frames, threads, workers)
    try:
        b.bare(0.5)  # warm caches and the thread pool
        bare, streamed, ratios, cpu_ratios, sub_cpu, bare_cpu, last = [], [], [], [], [], [], None
        for _ in range(repeats):
            bare.append(b.bare())
            bare_cpu.append(b.bare_cpu_us)
            last = b.streamed(nice=nice, switch_interval_ms=sw)
            sub_cpu.append(last["subscriber_cpu_us_per_frame"])
            streamed.append(last["throughput_hz"])
            ratios.append(streamed[-1] / bare[-1])
            cpu_ratios.append(b.bare_cpu_us / last["process_cpu_us_per_frame"])
        paced = {f"{int(100 * f)}pct": b.streamed(rate_hz=f * statistics.median(bare), nice=nice,
                                                  switch_interval_ms=sw)
                 for f in (0.6, 0.9)}
        return {
            "model": b.art.name, "backend": b.backend.name, "batch": batch, "frames": frames, "nice": nice,
            "setup": b.setup(), "switch_interval_ms": DEFAULT_SWITCH_MS if sw == "default" else sw,
            "bare_hz": bare, "streamed_hz": streamed, "efficiency": statistics.median(ratios),
            # CPU-bound devices: bare CPU per frame ÷ streamed CPU per frame (all threads), robust to other load
            "efficiency_cpu": statistics.median(cpu_ratios),
            # Latency needs a paced source: at max rate every queue is full and latency is queueing.
            "latency_ms_max_rate": _lat(last), **{f"latency_ms_{k}": _lat(r) for k, r in paced.items()},
            **{f"overhead_p99_ms_{k}": r["latency_ms"]["overhead"]["p99"] for k, r in paced.items()},
            "dropped_paced": sum(r["dropped"] for r in paced.values()),
            "copies_per_frame": last["copies_per_frame"]["slot_to_input"],
            "subscriber_cpu_us_per_frame": statistics.median(sub_cpu),
            "bare_cpu_us_per_frame": statistics.median(bare_cpu),
            "backend_busy_fraction": last["backend_busy_fraction"],
        }
    finally:
        b.close()


def run(args: argparse.Namespace) -> int:
    if args.what == "simulate":
        script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_simulate.py"
        if not script.is_file():
            raise FileNotFoundError(f"{script} not found: `bench simulate` runs from a source checkout")
        argv = sys.argv
        try:
            sys.argv = [str(script), "--preset", args.preset, "--positions", str(args.positions),
                        "--repeat", str(args.repeats)]
            runpy.run_path(str(script), run_name="__main__")
        finally:
            sys.argv = argv
        return 0
    res = bench_pipeline(args.model, args.backend, args.batch, args.frames, args.repeats, args.threads, args.nice,
                         "default" if args.switch_interval_ms is None else args.switch_interval_ms, args.workers)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    workers = res["setup"].get("workers") or 1
    print(f"{res['model']} on {res['backend']}, batch {res['batch']}, {res['setup']['threads']} threads in "
          f"{workers} session{'s' if workers > 1 else ''}, "
          f"{res['frames']} frames per run, GIL switch interval while streaming: "
          + (f"{res['switch_interval_ms']} ms" if res["switch_interval_ms"] else "the interpreter's"))
    print(f"bare backend:   {', '.join(f'{v:.1f}' for v in res['bare_hz'])} patterns/s")
    print(f"streamed:       {', '.join(f'{v:.1f}' for v in res['streamed_hz'])} patterns/s")
    print(f"efficiency:     {res['efficiency']:.3f} (median of streamed/bare per round); CPU-time efficiency "
          f"{res['efficiency_cpu']:.3f} (bare CPU/frame ÷ streamed CPU/frame)")
    for label, key in (("max rate", "latency_ms_max_rate"), ("60 % of bare", "latency_ms_60pct"),
                       ("90 % of bare", "latency_ms_90pct")):
        lat = res[key]
        print(f"latency ms at {label}: " + "; ".join(f"{k} p50 {v['p50']} p99 {v['p99']}" for k, v in lat.items()))
    print(f"pipeline overhead p99: {res['overhead_p99_ms_60pct']} ms at 60 %, {res['overhead_p99_ms_90pct']} ms "
          f"at 90 % of bare; dropped when paced: {res['dropped_paced']}")
    print(f"copies per frame between ring slot and backend input: {res['copies_per_frame']:.2f}")
    print(f"subscriber process (same host, shares the cores): {res['subscriber_cpu_us_per_frame']:.0f} µs CPU "
          f"per frame, against {res['bare_cpu_us_per_frame']:.0f} µs of process CPU per frame bare")
    return 0
