"""A DECTRIS detector stand-in: binds PUSH and emits byte-compatible stream v1 / v2 series at a paced rate."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
import threading
import time
from datetime import datetime
from typing import Any

import numpy as np

from . import codecs
from .sources.base import Pacer

log = logging.getLogger(__name__)

PROTOCOLS = ("stream1", "stream2")
ENCODINGS = ("bslz4", "lz4", "none")
MODES = ("blocking", "free-running")
DETAILS = ("all", "basic", "none")
CHANNELS = ("threshold_1", "threshold_2", "difference")
# Simulator encoding → (v1 codec, v2 codec): V1 "lz4<" is one bare LZ4 block, V2 "lz4" is framed.
_CODECS = {"bslz4": (codecs.BSLZ4, codecs.BSLZ4), "lz4": (codecs.LZ4_BLOCK, codecs.LZ4),
           "none": (codecs.RAW, codecs.RAW)}
_LOOPBACK = ("tcp://127.0.0.1:", "tcp://localhost:", "tcp://[::1]:", "ipc://", "inproc://")


# ---- stream v1 messages (lists of parts) -----------------------------------------------------------------

def _j(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def v1_header(series: int, detail: str, config: dict[str, Any], arrays: dict[str, np.ndarray] | None = None,
              appendix: bytes | None = None) -> list[bytes]:
    """dheader-1.0: config (basic, all), then flatfield / pixel mask / countrate table pairs (all)."""
    parts = [_j({"htype": "dheader-1.0", "series": series, "header_detail": detail})]
    if detail in ("basic", "all"):
        parts.append(_j(config))
    if detail == "all":
        for htype, name, dtype in (("dflatfield-1.0", "flatfield", "<f4"), ("dpixelmask-1.0", "mask", "<u4"),
                                   ("dcountrate_table-1.0", "countrate_table", "<f4")):
            a = np.ascontiguousarray((arrays or {})[name], dtype)
            parts += [_j({"htype": htype, "shape": [a.shape[1], a.shape[0]], "type": np.dtype(dtype).name}),
                      a.tobytes()]
    if appendix:
        parts.append(appendix)
    return parts


def v1_image(series: int, frame: int, payload: Any, shape: tuple[int, int], dtype: Any, encoding: str,
             md5: str = "", times_ns: tuple[int, int] = (0, 0), appendix: bytes | None = None) -> list[Any]:
    """dimage-1.0 (shape written [width, height] as the detector does) + dimage_d + blob + dconfig."""
    start, stop = times_ns
    parts = [_j({"htype": "dimage-1.0", "series": series, "frame": frame, "hash": md5}),
             _j({"htype": "dimage_d-1.0", "shape": [shape[1], shape[0]], "type": np.dtype(dtype).name,
                 "encoding": encoding, "size": memoryview(payload).nbytes}),
             payload,
             _j({"htype": "dconfig-1.0", "start_time": start, "stop_time": stop, "real_time": stop - start})]
    if appendix:
        parts.append(appendix)
    return parts


def v1_end(series: int) -> list[bytes]:
    return [_j({"htype": "dseries_end-1.0", "series": series})]


# ---- stream v2 messages (CBOR bytes) ---------------------------------------------------------------------

def v2_array(payload: bytes, shape: tuple[int, int], dtype: Any, codec: str) -> Any:
    """MultiDimArray tag 40 [dims, typed array], the bytes wrapped in tag 56500 when compressed."""
    from cbor2 import CBORTag

    from .sources.dectris_v2 import TYPED_ARRAY_TAG

    dt = np.dtype(dtype)
    if codec != codecs.RAW:
        payload = CBORTag(56500, ["bslz4" if codec == codecs.BSLZ4 else "lz4",
                                  dt.itemsize if codec == codecs.BSLZ4 else 0, payload])
    return CBORTag(40, [[int(shape[0]), int(shape[1])], CBORTag(TYPED_ARRAY_TAG[dt.name], payload)])


def _date() -> Any:
    from cbor2 import CBORTag

    # Written as an explicit tag 0 with millisecond precision and local offset, as the DCU does (cbor2
    # would write a datetime with microseconds).
    return CBORTag(0, datetime.now().astimezone().isoformat(timespec="milliseconds"))


def _rational(seconds: float) -> Any:
    from cbor2 import CBORTag

    return CBORTag(30, [int(round(seconds * 50_000_000)), 50_000_000])  # 20 ns ticks, as the DCU counts


def v2_message(fields: dict[str, Any]) -> bytes:
    import cbor2

    return cbor2.dumps(cbor2.CBORTag(55799, fields))


def ulid() -> str:
    """A ULID-shaped series_unique_id: 48-bit ms time + 80 random bits, Crockford base32."""
    n = (int(time.time() * 1000) << 80) | secrets.randbits(80)
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    return "".join(alphabet[(n >> (5 * i)) & 31] for i in reversed(range(26)))


def channel_frame(frame: np.ndarray, channel: str) -> np.ndarray:
    """Synthetic extra channels: threshold_2 sees half the photons, difference = threshold_1 − threshold_2."""
    if channel == "threshold_1":
        return frame
    half = frame // 2
    return half if channel == "threshold_2" else frame - half


# ---- the simulator ---------------------------------------------------------------------------------------

class DetectorSimulator:
    """Replays `frames` (N, H, W) unsigned integers as one detector series per run, like a DCU.

    blocking: send waits when the receiver's queues are full (lossless; hides loss). free-running: sends
    with NOBLOCK and counts what could not be sent in `dropped`, as the DCU's status/dropped. Images are
    paced with absolute deadlines (`rate_hz`; None = as fast as possible). Payloads are encoded once.
    """

    def __init__(self, frames: np.ndarray, protocol: str = "stream2", endpoint: str = "tcp://127.0.0.1:31001",
                 rate_hz: float | None = None, encoding: str = "bslz4", mode: str = "blocking",
                 header_detail: str = "all", channels: tuple[str, ...] = ("threshold_1",),
                 mask: np.ndarray | None = None, flatfield: np.ndarray | None = None,
                 geometry: dict[str, float] | None = None, allow_remote: bool = False, sndhwm: int = 1000,
                 md5: bool = True, first_series: int = 1, control_timeout_s: float = 30.0):
        for name, value, allowed in (("protocol", protocol, PROTOCOLS), ("encoding", encoding, ENCODINGS),
                                     ("mode", mode, MODES), ("header_detail", header_detail, DETAILS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        frames = np.asarray(frames)
        if frames.ndim != 3 or frames.dtype not in (np.uint8, np.uint16, np.uint32):
            raise ValueError(f"frames must be (N, H, W) uint8/16/32, got {frames.dtype} {frames.shape} "
                             "(use to_detector_dtype)")
        if not allow_remote and not endpoint.startswith(_LOOPBACK):
            raise ValueError(f"endpoint {endpoint} is not loopback; pass allow_remote to serve other hosts")
        bad = [c for c in channels if c not in CHANNELS]
        if bad or not channels:
            raise ValueError(f"channels must be among {CHANNELS}, got {channels}")
        self.frames, self.protocol, self.endpoint = frames, protocol, endpoint
        self.rate_hz, self.encoding, self.mode, self.detail = rate_hz, encoding, mode, header_detail
        # V1 has one image per message: only the first channel is sent.
        self.channels = tuple(channels[:1]) if protocol == "stream1" else tuple(channels)
        self.sndhwm, self.geometry = sndhwm, dict(geometry or {})
        h, w = frames.shape[1:]
        self.mask = np.zeros((h, w), np.uint32) if mask is None else np.asarray(mask, np.uint32)
        self.flatfield = np.ones((h, w), np.float32) if flatfield is None else np.asarray(flatfield, np.float32)
        self.countrate_table = np.stack([np.linspace(0, 2e6, 1000), np.linspace(0, 1.6e6, 1000)], 1).astype(np.float32)
        self.series, self.control_timeout_s = first_series, control_timeout_s
        self.sent = self.dropped = self.late = 0
        self.codec = _CODECS[encoding][0 if protocol == "stream1" else 1]
        Pacer(rate_hz)  # validates the rate
        t0 = time.perf_counter()
        self._payloads = [[self._encode(channel_frame(f, c)) for c in self.channels] for f in frames]
        self._md5 = [hashlib.md5(p[0]).hexdigest() if md5 and protocol == "stream1" else ""
                     for p in self._payloads]
        log.info("encoded %d frames (%s) in %.2f s", len(frames), encoding, time.perf_counter() - t0)
        self._sock: Any = None

    def _encode(self, frame: np.ndarray) -> Any:
        if self.codec == codecs.RAW and self.protocol == "stream1":
            return memoryview(np.ascontiguousarray(frame)).cast("B")  # a V1 blob is sent zero-copy from the frame
        return codecs.encode(self.codec, frame)

    def bind(self) -> str:
        """Bind the PUSH socket (port 0 → an ephemeral port); returns the endpoint actually bound."""
        import zmq

        if self._sock is None:
            self._sock = zmq.Context.instance().socket(zmq.PUSH)
            self._sock.setsockopt(zmq.SNDHWM, self.sndhwm)
            self._sock.bind(self.endpoint)
            self.endpoint = self._sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        return self.endpoint

    def close(self, wait_s: float = 5.0) -> None:
        """Close the socket; queued messages get up to `wait_s` to reach the receiver."""
        if self._sock is not None:
            self._sock.close(linger=int(wait_s * 1000))
            self._sock = None

    # ---- one series --------------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        h, w = self.frames.shape[1:]
        g = self.geometry
        return {"x_pixels_in_detector": w, "y_pixels_in_detector": h, "bit_depth_image": 8 * self.frames.itemsize,
                "nimages": len(self.frames), "ntrigger": 1, "trigger_mode": "ints",
                "frame_time": 1.0 / self.rate_hz if self.rate_hz else 0.0,
                "count_time": 1.0 / self.rate_hz if self.rate_hz else 0.0,
                "x_pixel_size": g.get("pixel_m", 75e-6), "y_pixel_size": g.get("pixel_m", 75e-6),
                "detector_distance": g.get("distance_m", 0.0), "photon_energy": g.get("energy_eV", 0.0),
                "wavelength": g.get("wavelength_A", 0.0), "beam_center_x": w / 2, "beam_center_y": h / 2,
                "description": "edgeptycho detector simulator", "detector_number": "SIM-0001",
                "software_version": "edgeptycho"}

    def _v2_start(self, uid: str) -> bytes:
        h, w = self.frames.shape[1:]
        c, full = self._config(), self.detail == "all"
        ff = {ch: v2_array(self.flatfield.tobytes(), (h, w), np.float32, codecs.RAW) for ch in self.channels}
        pm = {ch: v2_array(self.mask.tobytes(), (h, w), np.uint32, codecs.RAW) for ch in self.channels}
        from cbor2 import CBORTag
        lut = CBORTag(70, np.arange(1000, dtype="<u4").tobytes())
        fields: dict[str, Any] = {"type": "start", "series_id": self.series, "series_unique_id": uid,
                                  "arm_date": _date(), "beam_center_x": c["beam_center_x"],
                                  "beam_center_y": c["beam_center_y"], "channels": list(self.channels),
                                  "count_time": c["count_time"], "countrate_correction_enabled": False}
        if full:
            fields["countrate_correction_lookup_table"] = lut
        fields.update({"detector_description": c["description"], "detector_serial_number": c["detector_number"],
                       "detector_translation": [0.0, 0.0, c["detector_distance"]]})
        if full:
            fields["flatfield"] = ff
        fields.update({"flatfield_enabled": False, "frame_time": c["frame_time"],
                       "goniometer": {a: {"increment": 0.0, "start": 0.0}
                                      for a in ("chi", "kappa", "omega", "phi", "two_theta")},
                       "image_dtype": self.frames.dtype.name, "image_size_x": w, "image_size_y": h,
                       "incident_energy": c["photon_energy"], "incident_wavelength": c["wavelength"],
                       "number_of_images": len(self.frames)})
        if full:
            fields["pixel_mask"] = pm
        fields.update({"pixel_mask_enabled": True, "pixel_size_x": c["x_pixel_size"],
                       "pixel_size_y": c["y_pixel_size"], "saturation_value": int(np.iinfo(self.frames.dtype).max),
                       "sensor_material": "Si", "sensor_thickness": 450e-6,
                       "threshold_energy": {ch: c["photon_energy"] / 2 for ch in self.channels},
                       "user_data": {"source": "edgeptycho simulate-detector"},
                       "virtual_pixel_interpolation_enabled": False})
        return v2_message(fields)

    def _image(self, i: int, uid: str, date: Any) -> Any:
        shape, dtype = self.frames.shape[1:], self.frames.dtype
        period = 1.0 / self.rate_hz if self.rate_hz else 0.0
        if self.protocol == "stream1":
            enc = codecs.v1_encoding(self.codec, dtype)
            ns = int(i * period * 1e9)
            return v1_image(self.series, i, self._payloads[i][0], shape, dtype, enc, self._md5[i],
                            (ns, ns + int(period * 1e9)))
        data = {ch: v2_array(p, shape, dtype, self.codec) for ch, p in zip(self.channels, self._payloads[i], strict=True)}
        return v2_message({"type": "image", "series_id": self.series, "series_unique_id": uid, "image_id": i,
                           "real_time": _rational(period), "series_date": date,
                           "start_time": _rational(i * period), "stop_time": _rational((i + 1) * period),
                           "data": data})

    def _send(self, msg: Any, block: bool, stop: threading.Event | None = None) -> bool:
        """One message; blocking waits for room (interruptibly, via `stop`), free-running gives up at once."""
        import zmq

        while True:
            try:
                if isinstance(msg, list):
                    self._sock.send_multipart(msg, flags=zmq.NOBLOCK, copy=False)
                else:
                    self._sock.send(msg, flags=zmq.NOBLOCK, copy=False)
                return True
            except zmq.Again:
                if not block or (stop is not None and stop.is_set()):
                    return False
                self._sock.poll(100, zmq.POLLOUT)

    def _send_control(self, msg: Any, stop: threading.Event) -> None:
        """Header and end messages wait (up to control_timeout_s) for a receiver even when free-running."""
        import zmq

        deadline = time.monotonic() + self.control_timeout_s
        while not stop.is_set() and time.monotonic() < deadline:
            if self._sock.poll(100, zmq.POLLOUT) and self._send(msg, block=False):
                return
        log.warning("series %d: control message not delivered (no receiver)", self.series)

    def send_series(self, stop: threading.Event | None = None) -> dict[str, Any]:
        """Header, every image (paced), end; returns this series' counters."""
        stop = stop or threading.Event()
        self.bind()
        uid = ulid()
        sent0, dropped0 = self.sent, self.dropped
        if self.protocol == "stream1":
            arrays = {"mask": self.mask, "flatfield": self.flatfield, "countrate_table": self.countrate_table}
            self._send_control(v1_header(self.series, self.detail, self._config(), arrays), stop)
        else:
            self._send_control(self._v2_start(uid), stop)
        # series_date is when acquisition starts (after the start message reached a receiver): image times
        # are relative to it, so receivers get detector timestamps on the Unix clock.
        date = _date()
        pacer, block = Pacer(self.rate_hz), self.mode == "blocking"
        t0 = time.perf_counter()
        for i in range(len(self.frames)):
            if stop.is_set():
                break
            pacer.wait(stop)
            if self._send(self._image(i, uid, date), block, stop):
                self.sent += 1
            else:
                self.dropped += 1
        elapsed = time.perf_counter() - t0
        end = v1_end(self.series) if self.protocol == "stream1" else v2_message(
            {"type": "end", "series_id": self.series, "series_unique_id": uid})
        self._send_control(end, stop)
        self.late += pacer.late
        out = {"series": self.series, "sent": self.sent - sent0, "dropped": self.dropped - dropped0,
               "late": pacer.late, "seconds": round(elapsed, 4),
               "rate_hz": round((self.sent - sent0) / elapsed, 1) if elapsed > 0 else math.inf}
        self.series += 1
        return out

    def run(self, repeat: int = 1, stop: threading.Event | None = None) -> list[dict[str, Any]]:
        """`repeat` series back to back (0 = until stopped)."""
        stop = stop or threading.Event()
        reports, k = [], 0
        while not stop.is_set() and (repeat == 0 or k < repeat):
            reports.append(self.send_series(stop))
            k += 1
        return reports


def to_detector_dtype(frames: np.ndarray, dtype: Any = np.uint32) -> np.ndarray:
    """Counts (any real dtype) → the detector's unsigned integers: rounded, clipped at 0 and saturation."""
    dt = np.dtype(dtype)
    if frames.dtype == dt:
        return frames
    top = np.iinfo(dt).max
    return np.clip(np.rint(frames), 0, top).astype(dt)


def load_frames(path: str | os.PathLike[str], limit: int | None = None
                ) -> tuple[np.ndarray, np.ndarray | None, dict[str, float]]:
    """(first `limit` frames, mask, geometry) of a CXI scan via edgeptycho.io.cxi, or of any HDF5 file with
    entry_1/data_1/data."""
    import h5py

    from ..io.cxi import open_scan

    try:
        with open_scan(path) as scan:
            frames = scan.frames[:limit]
            geometry = {"pixel_m": scan.detector_pixel_m, "distance_m": scan.distance_m,
                        "energy_eV": scan.energy_J / 1.602176634e-19, "wavelength_A": scan.wavelength_m * 1e10}
            return frames, scan.mask, geometry
    except ValueError as exc:  # not a full CXI scan: fall back to the bare frame stack
        log.warning("%s: %s; sending frames only", path, exc)
    with h5py.File(path, "r") as f:
        for key in ("entry_1/data_1/data", "entry_1/instrument_1/detector_1/data"):
            if key in f and f[key].ndim == 3:
                return f[key][:limit], None, {}
    raise ValueError(f"{path}: no (N, H, W) frames at entry_1/data_1/data")


def synthetic_frames(n: int, shape: tuple[int, int] = (256, 256), dtype: Any = np.uint32, seed: int = 0,
                     photons: float = 0.5) -> np.ndarray:
    """Sparse Poisson frames with a bright centre, like far-field ptychography on a photon-counting detector."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    r2 = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2) / (0.05 * min(h, w)) ** 2
    lam = photons + 200.0 * np.exp(-r2)
    out = np.empty((n, h, w), dtype)
    for i in range(n):  # frame by frame: the int64 Poisson draw of a whole long series would not fit in memory
        out[i] = rng.poisson(lam)
    return out
