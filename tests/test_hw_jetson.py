"""Jetson backend against fake tensorrt 10 + cuda-python/pycuda: numerics, zero-copy, async streams, engine cache."""

from __future__ import annotations

import json
import logging
import threading

import numpy as np
import pytest
from fakes import devmem, hide, install_cuda_python, install_pycuda, install_tensorrt

from edgeptycho.hw import open_backend
from edgeptycho.tools.hil import agreement

ORIN = {"integrated": True, "name": "Orin (nvgpu)", "major": 8, "minor": 7}
H100 = {"integrated": False, "name": "NVIDIA H100 80GB HBM3", "major": 9, "minor": 0}


@pytest.fixture
def trt(monkeypatch, hw_cache):
    devmem.reset(**ORIN)
    install_cuda_python(monkeypatch)
    install_pycuda(monkeypatch)
    return install_tensorrt(monkeypatch)


@pytest.mark.parametrize("device", [ORIN, H100], ids=["orin", "dgpu"])
@pytest.mark.parametrize("binding", ["cuda-python", "pycuda"])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_agrees_with_cpu(trt, device, binding, precision, tiny_onnx, tiny_inputs, tiny_reference,
                         tiny_calibration):
    devmem.reset(**device)
    with open_backend("jetson", tiny_onnx.path, 4, precision, cuda_binding=binding,
                      calibration=tiny_calibration) as b:
        assert b.allocator().name == ("cuda-mapped" if device["integrated"] else "cuda-pinned")
        out = b.infer(tiny_inputs)  # 10 frames: 4 + 4 + a partial batch of 2
        assert b.engine.header["strongly_typed"] == (precision != "fp32")
    report = agreement(tiny_reference, out, precision)
    assert all(r["ok"] for r in report.values()), report
    assert not devmem.STATE.allocations  # close() freed every host and device buffer


def test_mapped_ring_slots_are_zero_copy_and_results_arrive_at_wait(trt, tiny_onnx, tiny_inputs, tiny_reference):
    with open_backend("jetson", tiny_onnx.path, 4) as b:
        alloc = b.allocator()
        slot = alloc.empty(b.input_spec.shape, np.float32)
        outputs = b.new_outputs(alloc)
        outputs["phase"].fill(np.nan)
        slot[...] = tiny_inputs[:4]
        assert alloc.device_pointer(slot[2:]) == alloc.device_pointer(slot) + 2 * slot[0].nbytes
        devmem.STATE.calls.clear()
        ticket = b.submit(slot, outputs)
        assert np.isnan(outputs["phase"]).all()  # queued on the stream, not yet run
        b.wait(ticket)
        assert devmem.STATE.calls == ["execute_async_v3"]  # no memcpy: the engine read and wrote the slots
        assert not ticket.extra["copy_back"]
        np.testing.assert_array_equal(outputs["phase"], tiny_reference["phase"][:4])


def test_discrete_gpu_copies_are_async_and_ordered(trt, tiny_onnx, tiny_inputs, tiny_reference):
    devmem.reset(**H100)
    with open_backend("jetson", tiny_onnx.path, 4, cuda_binding="cuda-python") as b:
        alloc = b.allocator()
        slot, outputs = alloc.empty(b.input_spec.shape, np.float32), b.new_outputs(alloc)
        slot[...] = tiny_inputs[:4]
        devmem.STATE.calls.clear()
        b.wait(b.submit(slot, outputs, n=3))
        assert devmem.STATE.calls == ["cudaMemcpyAsync(cudaMemcpyHostToDevice)", "execute_async_v3",
                                      "cudaMemcpyAsync(cudaMemcpyDeviceToHost)",
                                      "cudaMemcpyAsync(cudaMemcpyDeviceToHost)"]
        np.testing.assert_array_equal(outputs["amplitude"][:3], tiny_reference["amplitude"][:3])


def test_two_batches_in_flight_on_two_streams(trt, tiny_onnx, tiny_inputs, tiny_reference):
    with open_backend("jetson", tiny_onnx.path, 4) as b:
        ins = [tiny_inputs[:4].copy(), tiny_inputs[4:8].copy(), tiny_inputs[6:10].copy()]
        outs = [b.new_outputs() for _ in range(3)]
        t0, t1 = b.submit(ins[0], outs[0]), b.submit(ins[1], outs[1])
        assert t0.handle.stream is not t1.handle.stream and t0.handle.ctx is not t1.handle.ctx
        t2 = b.submit(ins[2], outs[2])  # reuses slot 0: finishes batch 0 first, so its ticket stays valid
        assert t0.extra["done"] and not t1.extra["done"]
        for t, lo in ((t1, 4), (t2, 6), (t0, 0)):
            np.testing.assert_array_equal(b.wait(t)["phase"], tiny_reference["phase"][lo:lo + 4])


def test_engine_cache_key_and_rebuilds(trt, tiny_onnx, hw_cache, caplog):
    open_backend("jetson", tiny_onnx.path, 4, "fp16").close()
    assert trt.BUILDS[0] == 1
    (key_file,) = (hw_cache / "trt").glob("*.json")
    key = json.loads(key_file.read_text())
    assert key["tensorrt"] == "10.3.0" and key["gpu"] == "Orin (nvgpu)" and key["compute_capability"] == "8.7"
    assert len(key["model_sha256"]) == 64 and key["precision"] == "fp16"
    open_backend("jetson", tiny_onnx.path, 4, "fp16").close()
    assert trt.BUILDS[0] == 1  # cache hit
    trt.__version__ = "10.4.0"
    with caplog.at_level(logging.WARNING, logger="edgeptycho.hw.jetson"):
        open_backend("jetson", tiny_onnx.path, 4, "fp16").close()
    assert trt.BUILDS[0] == 2 and "different tensorrt" in caplog.text
    devmem.reset(**H100)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edgeptycho.hw.jetson"):
        open_backend("jetson", tiny_onnx.path, 4, "fp16").close()
    assert trt.BUILDS[0] == 3 and "compute_capability, gpu" in caplog.text
    (plan,) = (hw_cache / "trt").glob("*.plan")
    plan.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="edgeptycho.hw.jetson"):
        b = open_backend("jetson", tiny_onnx.path, 4, "fp16")
    assert trt.BUILDS[0] == 4 and "failed to deserialize" in caplog.text
    b.close()


def test_pycuda_context_is_pushed_in_worker_threads(trt, monkeypatch, tiny_onnx, tiny_inputs, tiny_reference):
    import pycuda.driver as cuda

    with pytest.raises(cuda.LogicError, match="explicit_context_dependent"):
        cuda.mem_alloc(16)  # the fake enforces pycuda's per-thread context rule
    hide(monkeypatch, "cuda")  # no cuda-python: the default binding falls to pycuda
    b = open_backend("jetson", tiny_onnx.path, 4)
    assert b.cuda.name == "pycuda"
    result = {}

    def worker():
        result["out"] = b.infer(tiny_inputs[:4])

    th = threading.Thread(target=worker)
    th.start()
    th.join()
    b.close()
    np.testing.assert_array_equal(result["out"]["amplitude"], tiny_reference["amplitude"][:4])


def test_unreadable_and_unparsable_models_are_reported(trt, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(ValueError, match="bad.onnx: not a readable ONNX model"):
        open_backend("jetson", bad, 4)
    x = helper.make_tensor_value_info("diffraction", TensorProto.FLOAT, ["batch", 1, 4, 4])
    y = helper.make_tensor_value_info("amplitude", TensorProto.FLOAT, ["batch", 1, 4, 4])
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["diffraction"], ["amplitude"])], "g", [x], [y])
    onnx.save(helper.make_model(graph), tmp_path / "odd.onnx")
    with pytest.raises(RuntimeError, match="TensorRT could not parse .*odd.onnx.*NoSuchOp"):
        open_backend("jetson", tmp_path / "odd.onnx", 4)


def test_fake_has_no_removed_tensorrt8_api(trt):
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    config = builder.create_builder_config()
    for obj, attr in ((builder, "build_engine"), (builder, "max_batch_size"), (config, "max_workspace_size"),
                      (config, "int8_calibrator"), (trt.IExecutionContext, "execute_async_v2"),
                      (trt.ICudaEngine, "get_binding_shape"), (trt.ICudaEngine, "binding_is_input"),
                      (trt.ICudaEngine, "num_bindings")):
        assert not hasattr(obj, attr)
    with pytest.raises(AttributeError):
        config.max_workspace_size = 1 << 30


def test_fake_catches_a_buffer_freed_before_the_launch_ran(trt, tiny_onnx, tiny_inputs):
    b = open_backend("jetson", tiny_onnx.path, 4)
    slot = b.allocator().empty(b.input_spec.shape, np.float32)
    slot[...] = tiny_inputs[:4]
    ticket = b.submit(slot, b.new_outputs(b.allocator()))
    devmem.free(slot.ctypes.data, ("mapped",))  # what a ring releasing a slot too early would do
    with pytest.raises(RuntimeError, match="cudaStreamSynchronize failed: cudaErrorIllegalAddress"):
        b.wait(ticket)
    # not closed: the allocator would try to free the slot a second time
