"""Helpers for the pipeline tests: a tiny model artifact, small simulated scans, a subscriber, a slow backend."""

from __future__ import annotations

import threading
import time
from pathlib import Path

_TINY: list[Path] = []


def tiny_artifact_path(tmp_path_factory) -> Path:
    """The shipped `tiny` model when the zoo has it, else the tiny preset exported with seeded random weights
    (once per session). Pipeline tests check accounting and plumbing, which do not depend on trained weights.
    """
    from edgeptycho.model.artifact import ModelArtifact

    if _TINY:
        return _TINY[0]
    try:
        _TINY.append(ModelArtifact.load("tiny").path)
        return _TINY[0]
    except FileNotFoundError:
        pass
    import torch

    from edgeptycho.model.artifact import write_artifact
    from edgeptycho.model.export import export_onnx
    from edgeptycho.model.network import build_network, load_preset

    torch.manual_seed(0)
    preset = load_preset("tiny")
    path = tmp_path_factory.mktemp("pipeline_model") / "tiny-random.onnx"
    export_onnx(build_network(preset.network), path)
    write_artifact(path, {
        "name": "tiny-random", "version": "test", "architecture": preset.to_dict(),
        "input_size": preset.network.input_size, "output_size": preset.network.output_size,
        "frame_size": preset.frame_size, "preprocess": preset.preprocess.to_dict()})
    _TINY.append(path)
    return path


def small_scan(n_positions: int = 60, seed: int = 0):
    """A 64-px-frame Siemens-star scan (the `small` preset) with ground truth."""
    from edgeptycho.physics.simulate import preset, simulate

    return simulate(preset("small").replace(scan={"n_positions": n_positions}), seed=seed)


class Collector:
    """Subscriber thread recording every results-stream message (patch frame ids in arrival order)."""

    def __init__(self, endpoint: str, rcvhwm: int = 100_000):
        from edgeptycho.stream.publish import Subscriber

        self.sub = Subscriber(endpoint, rcvhwm=rcvhwm)
        self.patch_ids: list[int] = []
        self.mosaics: list = []
        self.status: list[dict] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        time.sleep(0.2)  # ZeroMQ slow joiner: let the subscription reach the publisher

    def _run(self) -> None:
        while not self._stop.is_set():
            msg = self.sub.recv(timeout=0.05)
            if msg is None:
                continue
            if msg.topic == "patch":
                self.patch_ids.append(int(msg.header["frame_id"]))
            elif msg.topic == "mosaic":
                self.mosaics.append(msg)
            else:
                self.status.append(msg.header)

    def close(self, expect_patches: int = 0, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.patch_ids) < expect_patches and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        self._stop.set()
        self.thread.join()
        self.sub.close()


class SlowBackend:
    """Wraps a backend and sleeps `delay_s` in every submit: an overloaded device, for drop accounting."""

    def __init__(self, backend, delay_s: float):
        self._b, self.delay_s = backend, delay_s

    def __getattr__(self, name):
        return getattr(self._b, name)

    def submit(self, inputs, outputs, n=None):
        time.sleep(self.delay_s)
        return self._b.submit(inputs, outputs, n=n)

