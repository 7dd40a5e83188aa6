"""The GIL switch interval: shortened while a pipeline runs, the interpreter's own restored after."""

from __future__ import annotations

import sys

import pytest
from pipeline_support import small_scan, tiny_artifact_path

from edgeptycho.hw.registry import open_backend
from edgeptycho.model.artifact import ModelArtifact
from edgeptycho.pipeline.runner import Pipeline, ScanInfo, ServeConfig
from edgeptycho.stream.ring import RingConfig
from edgeptycho.stream.sources.replay import ArraySource


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    art = ModelArtifact.load(tiny_artifact_path(tmp_path_factory))
    backend = open_backend("cpu", art.path, 8, threads=1)
    yield art, backend, small_scan(20)
    backend.close()


def _pipe(parts, backend=None, **kw):
    art, shared, scan = parts
    backend = backend or shared
    return Pipeline(ArraySource.from_scan(scan), backend, art.preprocess, art.output_size, RingConfig(slots=16),
                    scan=ScanInfo.from_scan(scan), **kw)


def test_switch_interval_is_set_while_running_and_restored_after(parts):
    before = sys.getswitchinterval()
    pipe = _pipe(parts, switch_interval_ms=0.25)
    pipe.start()
    during = sys.getswitchinterval()
    assert pipe.wait(60)
    assert during == pytest.approx(0.25e-3)
    assert sys.getswitchinterval() == before
    assert pipe.report()["frames_published"] == 20


def test_two_overlapping_pipelines_restore_the_original_once_both_end(parts):
    before = sys.getswitchinterval()
    own = open_backend("cpu", parts[0].path, 8, threads=1)  # one backend per pipeline: one io binding each
    try:
        a, b = _pipe(parts, switch_interval_ms=0.5), _pipe(parts, backend=own, switch_interval_ms=0.5)
        a.start()
        b.start()
        assert a.wait(60)
        assert sys.getswitchinterval() == pytest.approx(0.5e-3)  # b is still running
        assert b.wait(60)
        assert sys.getswitchinterval() == before
    finally:
        own.close()


def test_null_keeps_the_interpreter_setting_and_bad_values_name_the_key(parts):
    before = sys.getswitchinterval()
    pipe = _pipe(parts, switch_interval_ms=None)
    pipe.start()
    assert sys.getswitchinterval() == before
    assert pipe.wait(60)
    with pytest.raises(ValueError, match="switch_interval_ms"):
        ServeConfig(switch_interval_ms=0.0)
