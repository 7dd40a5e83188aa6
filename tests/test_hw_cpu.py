"""CPU backend: ONNX Runtime numerics, outputs written into preallocated arrays, partial batches, QDQ, shm slots."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from edgeptycho.hw import open_backend
from edgeptycho.hw.cpu import physical_cores
from edgeptycho.hw.memory import SharedMemoryAllocator


@pytest.fixture(scope="module")
def reference(tiny_onnx, tiny_inputs):
    sess = ort.InferenceSession(str(tiny_onnx.path), providers=["CPUExecutionProvider"])
    return dict(zip(("amplitude", "phase"), sess.run(["amplitude", "phase"], {"diffraction": tiny_inputs}), strict=True))


def test_specs_follow_the_model(tiny_onnx):
    with open_backend("cpu", tiny_onnx.path, 4) as b:
        assert b.input_spec.shape == (4, 1, 32, 32) and b.input_spec.dtype == np.float32
        assert [(s.name, s.shape) for s in b.output_spec] == [("amplitude", (4, 1, 16, 16)),
                                                               ("phase", (4, 1, 16, 16))]
        assert b.threads == physical_cores() >= 1


def test_infer_matches_onnxruntime(tiny_onnx, tiny_inputs, reference):
    with open_backend("cpu", tiny_onnx.path, 4, threads=1) as b:
        out = b.infer(tiny_inputs)  # 10 frames: two full batches and a partial one
    for name, ref in reference.items():
        np.testing.assert_allclose(out[name], ref, rtol=1e-5, atol=1e-6)


def test_submit_writes_into_the_callers_arrays_and_only_n_rows(tiny_onnx, tiny_inputs, reference):
    with open_backend("cpu", tiny_onnx.path, 4) as b:
        alloc = b.allocator()
        batch = alloc.empty(b.input_spec.shape, np.float32)
        outputs = b.new_outputs(alloc)
        for arr in outputs.values():
            arr.fill(np.nan)
        batch[:3] = tiny_inputs[:3]
        batch[3] = 1e6  # garbage beyond n must not matter
        ticket = b.submit(batch, outputs, n=3)
        got = b.wait(ticket)
        assert ticket.n == 3
        for name in reference:
            assert got[name] is outputs[name]  # no new arrays: results land in the preallocated buffers
            np.testing.assert_allclose(got[name][:3], reference[name][:3], rtol=1e-5, atol=1e-6)
            assert np.isnan(got[name][3]).all()  # the dynamic batch ran on the first n frames only
        addresses = {k: v.ctypes.data for k, v in outputs.items()}
        batch[:4] = tiny_inputs[4:8]
        b.wait(b.submit(batch, outputs))
        assert {k: v.ctypes.data for k, v in outputs.items()} == addresses
        np.testing.assert_allclose(outputs["phase"], reference["phase"][4:8], rtol=1e-5, atol=1e-6)


def test_bad_buffers_are_named(tiny_onnx, tiny_inputs):
    with open_backend("cpu", tiny_onnx.path, 4) as b:
        outputs = b.new_outputs()
        with pytest.raises(ValueError, match="C-contiguous float32"):
            b.submit(tiny_inputs[:4].astype(np.float64), outputs)
        with pytest.raises(ValueError, match="n=5 outside 1..4"):
            b.submit(np.zeros((5, 1, 32, 32), np.float32), outputs)
        with pytest.raises(ValueError, match="outputs lack 'phase'"):
            b.submit(tiny_inputs[:4], {"amplitude": outputs["amplitude"]})
        with pytest.raises(ValueError, match="does not match model"):
            b.infer(np.zeros((2, 1, 16, 16), np.float32))


def test_qdq_model_runs_as_int8_and_precision_must_match(tiny_onnx, tiny_inputs, reference, tmp_path):
    from edgeptycho.quantization.qdq import derive_model, synthetic_patterns

    qdq = derive_model(tiny_onnx.path, "trt-int8", tmp_path, synthetic_patterns(16, 32))
    with open_backend("cpu", qdq, 4, "int8") as b:
        out = b.infer(tiny_inputs)
    span = np.ptp(reference["phase"])
    assert 0 < np.abs(out["phase"] - reference["phase"]).max() < 0.15 * span  # quantised, and close
    with pytest.raises(ValueError, match="QDQ-quantised: open it with precision='int8'"):
        open_backend("cpu", qdq, 4)
    with pytest.raises(ValueError, match="has no Q/DQ nodes"):
        open_backend("cpu", tiny_onnx.path, 4, "int8")


def test_shared_memory_slots_feed_the_backend_in_place(tiny_onnx, tiny_inputs, reference):
    producer = SharedMemoryAllocator()
    try:
        slot = producer.empty((4, 1, 32, 32), np.float32)
        slot[...] = tiny_inputs[:4]
        seg, view = SharedMemoryAllocator.attach(producer.names[0], (4, 1, 32, 32), np.float32)
        with open_backend("cpu", tiny_onnx.path, 4) as b:
            out = b.wait(b.submit(view, b.new_outputs()))
        np.testing.assert_allclose(out["amplitude"], reference["amplitude"][:4], rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="holds"):
            SharedMemoryAllocator.attach(producer.names[0], (8, 1, 32, 32), np.float32)
        del view
        seg.close()
    finally:
        producer.close()


def test_telemetry_is_explicit(tiny_onnx):
    with open_backend("cpu", tiny_onnx.path, 2) as b:
        tel = b.telemetry()
    assert "power_w" in tel and (tel["power_w"] is not None or tel["unavailable"])


def test_parallel_sessions_compute_the_same_results_in_any_wait_order(tiny_onnx, tiny_inputs, reference):
    with open_backend("cpu", tiny_onnx.path, 4, threads=2, workers=2) as b:
        assert b.workers == 2 and len(b.sessions) == 2 and b.wait_from_other_thread
        batches = [np.ascontiguousarray(tiny_inputs[i:i + 4]) for i in (0, 4)]
        outs = [b.new_outputs(), b.new_outputs()]
        tickets = [b.submit(x, o) for x, o in zip(batches, outs, strict=True)]  # both in flight at once
        for i in (1, 0):  # waited out of order: each ticket still gets its own batch's results
            got = b.wait(tickets[i])
            np.testing.assert_allclose(got["phase"], reference["phase"][4 * i:4 * i + 4], rtol=1e-5, atol=1e-6)
        # a third submit reuses the first session: it must not overwrite a batch still being read
        out = b.infer(tiny_inputs)  # 10 frames through alternating sessions
    for name, ref in reference.items():
        np.testing.assert_allclose(out[name], ref, rtol=1e-5, atol=1e-6)


def test_workers_are_checked_and_default_to_two_sessions_on_two_cores(tiny_onnx):
    with open_backend("cpu", tiny_onnx.path, 4, threads=2) as b:
        assert b.workers == 2
    with open_backend("cpu", tiny_onnx.path, 4, threads=1) as b:
        assert b.workers == 1 and not b.wait_from_other_thread  # one session computes inside submit()
    with pytest.raises(ValueError, match="workers"):
        open_backend("cpu", tiny_onnx.path, 4, threads=2, workers=3)
    with pytest.raises(ValueError, match="workers"):
        open_backend("jetson-emu", tiny_onnx.path, 4, threads=2, workers=2)


def test_a_failed_run_on_a_session_thread_is_raised_by_wait(tiny_onnx, tiny_inputs):
    with open_backend("cpu", tiny_onnx.path, 4, threads=2, workers=2) as b:
        batch = np.ascontiguousarray(tiny_inputs[:4])
        outputs = b.new_outputs()
        run = b.sessions[0].run_with_iobinding
        b.sessions[0].run_with_iobinding = None  # the session breaks on its own thread
        ticket = b.submit(batch, outputs)
        with pytest.raises(TypeError):
            b.wait(ticket)
        b.sessions[0].run_with_iobinding = run  # the failure is not sticky: that session takes batches again
        for _ in range(2):
            got = b.wait(b.submit(batch, outputs))
        np.testing.assert_allclose(got["phase"], b.infer(batch)["phase"], rtol=1e-5, atol=1e-6)
