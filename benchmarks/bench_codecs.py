"""Detector-stream throughput: decode + land into preallocated slots per codec and library, message parsing,
and simulator → loopback → receiver → ring end to end.

    nice -n 19 python benchmarks/bench_codecs.py                  # codecs, one core, GB/s of raw frames
    nice -n 19 python benchmarks/bench_codecs.py --e2e --rate 2000 --frames 4000 --shape 514 1030

GB/s are uncompressed frame bytes landed per second of the decoding thread's CPU time (thread_time), so
other load on a shared machine inflates the numbers less than wall time would; both are printed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time

import numpy as np

from edgeptycho.stream import codecs as c
from edgeptycho.stream.detector_sim import DetectorSimulator, synthetic_frames

EIGER_4M_GBPS = 2162 * 2068 * 2 * 2000 / 1e9  # 2 kHz 4M EIGER, 16-bit, uncompressed: 17.9 GB/s


def bench_decode(codec: str, impl: str, frames: np.ndarray, min_s: float) -> dict[str, float]:
    """Decode every pre-encoded frame into its own preallocated slot, repeatedly, for at least min_s."""
    c.use(codec, impl)
    try:
        payloads = [c.encode(codec, f) for f in frames]
        slots = np.empty_like(frames)
        for p, s in zip(payloads, slots, strict=True):  # warm: page in the slots once, check correctness
            c.decode_into(codec, p, s)
        assert np.array_equal(slots, frames), f"{codec}/{impl} does not round-trip"
        n, cpu0, wall0 = 0, time.thread_time(), time.perf_counter()
        while time.perf_counter() - wall0 < min_s or n < 3 * len(frames):
            for p, s in zip(payloads, slots, strict=True):
                c.decode_into(codec, p, s)
            n += len(frames)
        cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
    finally:
        c.use(codec, None)
    raw = n * frames[0].nbytes
    return {"GBps_cpu": raw / cpu / 1e9, "GBps_wall": raw / wall / 1e9, "us_per_frame": 1e6 * cpu / n,
            "ratio": frames[0].nbytes / np.mean([len(p) for p in payloads])}


def bench_messages(frames: np.ndarray, min_s: float) -> dict[str, float]:
    """Whole-message handling without the network: parse + decode + land + commit (bslz4), per protocol."""
    from edgeptycho.stream.ring import FrameRing
    from edgeptycho.stream.sources.dectris_v1 import DectrisV1Source
    from edgeptycho.stream.sources.dectris_v2 import DectrisV2Source

    out = {}
    for protocol, cls in (("stream1", DectrisV1Source), ("stream2", DectrisV2Source)):
        sim = DetectorSimulator(frames, protocol=protocol, endpoint="tcp://127.0.0.1:0", md5=False)
        from edgeptycho.stream.detector_sim import v2_message

        head = v2_message({"type": "start", "series_id": 1})  # header cost is per series, not per frame
        msgs = [sim._image(i, "U", None) for i in range(len(frames))]
        if protocol == "stream1":
            from edgeptycho.stream.detector_sim import v1_header

            head = v1_header(1, "none", {})
            msgs = [[bytes(p) for p in m] for m in msgs]
        ring = FrameRing(len(frames) + 1, frames.shape[1:], frames.dtype, policy="latest")
        n, cpu0, wall0 = 0, time.thread_time(), time.perf_counter()
        while time.perf_counter() - wall0 < min_s or n < 3 * len(frames):
            src = cls(frame_shape=frames.shape[1:], dtype=frames.dtype)
            src.attach(ring)
            src.handle(head)
            for m in msgs:
                src.handle(m)
            b = ring.take(len(frames), timeout=0)
            ring.release(b.slots)
            ring.take(1, timeout=0)  # the end-of-series marker the next header leaves
            n += len(frames)
        cpu = time.thread_time() - cpu0
        out[protocol] = {"GBps_cpu": n * frames[0].nbytes / cpu / 1e9, "us_per_frame": 1e6 * cpu / n}
    return out


def run_codecs(args: argparse.Namespace) -> None:
    results = []
    for shape in ((256, 256), (514, 1030), *((tuple(args.shape),) if args.shape else ())):
        for dtype in (np.uint32, np.uint16):
            frames = synthetic_frames(args.frames, shape, dtype, seed=1, photons=args.photons)
            for codec in c.CODECS:
                for impl in c.available(codec):
                    r = bench_decode(codec, impl, frames, args.seconds)
                    row = {"shape": f"{shape[0]}x{shape[1]}", "dtype": np.dtype(dtype).name, "codec": codec,
                           "impl": impl, **{k: round(v, 3) for k, v in r.items()}}
                    results.append(row)
                    print(json.dumps(row), flush=True)
            msg = bench_messages(frames, args.seconds)
            for protocol, r in msg.items():
                row = {"shape": f"{shape[0]}x{shape[1]}", "dtype": np.dtype(dtype).name,
                       "codec": f"{protocol} message bslz4", "impl": "default",
                       **{k: round(v, 3) for k, v in r.items()}}
                results.append(row)
                print(json.dumps(row), flush=True)
    largest = results[-1]["shape"]
    best = max((r for r in results if r["codec"] == c.BSLZ4 and r["shape"] == largest and r["dtype"] == "uint16"),
               key=lambda r: r["GBps_cpu"])
    print(f"\nbest bslz4 at {largest} uint16: {best['impl']} {best['GBps_cpu']:.2f} GB/s per core; a 2 kHz 4M "
          f"EIGER ({EIGER_4M_GBPS:.0f} GB/s) needs ~{EIGER_4M_GBPS / best['GBps_cpu']:.1f} cores for decoding "
          "alone (decoders release the GIL: one decode thread per core)")


def run_e2e(args: argparse.Namespace) -> None:
    """Simulator in its own process at --rate → PULL receiver → ring; a consumer releases slots at once."""
    from edgeptycho.stream.ring import FrameRing
    from edgeptycho.stream.sources.dectris_v1 import DectrisV1Source
    from edgeptycho.stream.sources.dectris_v2 import DectrisV2Source

    shape, dtype = tuple(args.shape or (514, 1030)), args.dtype
    cmd = [sys.executable, "-m", "edgeptycho.cli", "simulate-detector", "--protocol", args.protocol,
           "--endpoint", "tcp://127.0.0.1:0", "--frames", str(args.frames), "--shape", *map(str, shape),
           "--dtype", dtype, "--rate", str(args.rate), "--encoding", args.encoding, "--mode", args.mode]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    hello = json.loads(proc.stdout.readline())
    ring = FrameRing(args.slots, shape, dtype, policy="free-running")
    cls = DectrisV1Source if args.protocol == "stream1" else DectrisV2Source
    src = cls(hello["endpoint"], frame_shape=shape, dtype=dtype, max_series=1, idle_timeout_s=30)
    taken, ids, times = 0, [], []
    cpu0 = time.process_time()
    thread, _ = src.start(ring)

    def consume() -> None:
        nonlocal taken
        while True:
            b = ring.take(64, timeout=1.0)
            if len(b):
                times.append(time.perf_counter())
            taken += len(b)
            ids.extend(b.frame_ids.tolist())
            ring.release(b.slots)
            if b.closed:
                return

    consumer = threading.Thread(target=consume)
    consumer.start()
    report = json.loads(proc.stdout.readline())
    thread.join(60)
    consumer.join(60)
    proc.wait(30)
    cpu = time.process_time() - cpu0
    missing = sorted(set(range(args.frames)) - set(ids))
    out = {"protocol": args.protocol, "encoding": args.encoding, "mode": args.mode, "shape": list(shape),
           "dtype": dtype, "rate_hz": args.rate, "simulator": report, "receiver": src.counters(),
           "ring": {k: v for k, v in ring.stats().items() if k in ("received", "dropped", "high_water")},
           "consumer_taken": taken, "missing_ids": len(missing),
           "receiver_cpu_s_per_frame_us": round(1e6 * cpu / max(taken, 1), 1),
           # measured where frames leave the ring (ZeroMQ queues can hold thousands of frames)
           "received_hz": round(taken / (times[-1] - times[0]), 1) if len(times) > 1 else None,
           "raw_GBps": round(taken * np.prod(shape) * np.dtype(dtype).itemsize / (times[-1] - times[0]) / 1e9, 3)
           if len(times) > 1 else None}
    print(json.dumps(out, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=16, help="distinct frames (codecs) or frames sent (--e2e)")
    p.add_argument("--seconds", type=float, default=1.0, help="minimum timing per case")
    p.add_argument("--photons", type=float, default=0.5, help="mean photons per pixel outside the centre")
    p.add_argument("--shape", type=int, nargs=2, help="an extra frame shape (e.g. 2162 2068 for a 4M)")
    p.add_argument("--e2e", action="store_true", help="simulator → loopback → receiver → ring instead")
    p.add_argument("--protocol", default="stream2", choices=("stream1", "stream2"))
    p.add_argument("--encoding", default="bslz4", choices=("bslz4", "lz4", "none"))
    p.add_argument("--mode", default="free-running", choices=("blocking", "free-running"))
    p.add_argument("--rate", type=float, default=2000.0)
    p.add_argument("--dtype", default="uint16", choices=("uint16", "uint32"))
    p.add_argument("--slots", type=int, default=256)
    args = p.parse_args()
    run_e2e(args) if args.e2e else run_codecs(args)


if __name__ == "__main__":
    main()
