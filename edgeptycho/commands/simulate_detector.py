"""`edgeptycho simulate-detector`: stream a CXI scan (or synthetic frames) as a DECTRIS detector would."""

from __future__ import annotations

import argparse
import json
import sys

from ..stream import detector_sim as ds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--protocol", choices=ds.PROTOCOLS, default="stream2",
                        help="stream1 = SIMPLON legacy JSON (port 9999), stream2 = CBOR (port 31001)")
    parser.add_argument("--scan", help="CXI scan whose frames are sent (default: synthetic Poisson frames)")
    parser.add_argument("--frames", type=int, help="synthetic frames (default 100), or the first N of --scan (default all)")
    parser.add_argument("--shape", type=int, nargs=2, default=(256, 256), metavar=("H", "W"),
                        help="synthetic frame shape (default 256 256; a EIGER module is 514 1030)")
    parser.add_argument("--dtype", choices=("uint8", "uint16", "uint32"), default="uint32",
                        help="detector pixel type (bit_depth_image); scan counts are rounded and clipped to it")
    parser.add_argument("--rate", type=float, default=0.0, help="images per second (0 = as fast as possible)")
    parser.add_argument("--endpoint", help="PUSH endpoint to bind (default tcp://127.0.0.1:9999 or :31001; "
                        "port 0 picks a free one and prints it)")
    parser.add_argument("--encoding", choices=ds.ENCODINGS, default="bslz4",
                        help="bslz4 (default, with the 12-byte header), lz4, none")
    parser.add_argument("--mode", choices=ds.MODES, default="blocking",
                        help="blocking: wait for the receiver; free-running: drop and count like a real DCU")
    parser.add_argument("--repeat", type=int, default=1, help="series to send (0 = until interrupted)")
    parser.add_argument("--header-detail", choices=ds.DETAILS, default="all",
                        help="all: config + flatfield + pixel mask + countrate table; basic: config; none")
    parser.add_argument("--channels", default="threshold_1",
                        help=f"stream2 image channels, comma-separated, among {','.join(ds.CHANNELS)}")
    parser.add_argument("--sndhwm", type=int, default=1000, help="PUSH high-water mark in messages")
    parser.add_argument("--allow-remote", action="store_true",
                        help="allow binding a non-loopback endpoint (other hosts can then connect)")


def run(args: argparse.Namespace) -> int:
    if args.frames is not None and args.frames < 1:
        raise ValueError(f"--frames must be >= 1, got {args.frames}")
    mask, geometry = None, {}
    if args.scan:
        frames, mask, geometry = ds.load_frames(args.scan, args.frames)
    else:
        frames = ds.synthetic_frames(args.frames or 100, tuple(args.shape), args.dtype)
    frames = ds.to_detector_dtype(frames, args.dtype)
    endpoint = args.endpoint or f"tcp://127.0.0.1:{9999 if args.protocol == 'stream1' else 31001}"
    sim = ds.DetectorSimulator(
        frames, protocol=args.protocol, endpoint=endpoint, rate_hz=args.rate or None, encoding=args.encoding,
        mode=args.mode, header_detail=args.header_detail, channels=tuple(args.channels.split(",")), mask=mask,
        geometry=geometry, allow_remote=args.allow_remote, sndhwm=args.sndhwm)
    try:
        bound = sim.bind()
        print(json.dumps({"endpoint": bound, "protocol": args.protocol, "frames": len(frames),
                          "shape": list(frames.shape[1:]), "dtype": frames.dtype.name}), flush=True)
        for report in sim.run(args.repeat):
            print(json.dumps(report), flush=True)
    finally:
        sim.close()
        import zmq

        # Before the process exits: libzmq sends what is still queued (the last images and the end message)
        # only while its context lives; term() waits for that, bounded by the socket's linger.
        zmq.Context.instance().term()
    sys.stdout.flush()
    return 0
