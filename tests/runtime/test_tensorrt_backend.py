"""The TensorRT backend's parts that run without a GPU: backend choice, refusals, plan compatibility,
profile choice, and the device cache writes' offsets (against HostStorage, on a host emulation of
cudaMemcpy2DAsync's documented semantics). The plans themselves need a GPU: `gpu` / `tensorrt` tests."""

from __future__ import annotations

import ctypes
import logging
import types
from pathlib import Path

import numpy as np
import pytest

from llama4_deploy.runtime import backends, tensorrt_backend
from llama4_deploy.runtime.bundle import BundleError, Manifest
from llama4_deploy.runtime.kv_cache import HostStorage


def _manifest(tmp_path: Path, backend="tensorrt", plans=None, compute="float32", record=True) -> Manifest:
    engine = {"backend": backend, "compute_dtype": compute, "graphs": {}}
    if record:
        engine["tensorrt"] = {"linted_for": "10.15", "profiles": {"gather.onnx": []}, "plans": plans}
    return Manifest({"name": "tiny", "engine": engine}, tmp_path)


PLANS = {"tensorrt_version": "10.15.1", "gpu": "NVIDIA H200", "compute_capability": "9.0",
         "files": {"gather.onnx": {"plan": "gather.plan"}}}


def test_onnxruntime_bundle_stays_on_onnxruntime(tmp_path):
    assert backends.choose(_manifest(tmp_path, "onnxruntime", record=False), trt_available=True) == "onnxruntime"
    with pytest.raises(BundleError, match="ONNX Runtime bundle; build it with --target tensorrt"):
        backends.choose(_manifest(tmp_path, "onnxruntime", record=False), "tensorrt", trt_available=True)


def test_tensorrt_bundle_without_tensorrt_runs_its_graphs_on_onnxruntime_and_says_so_once(tmp_path, caplog):
    manifest = _manifest(tmp_path / "a", plans=PLANS)
    with caplog.at_level(logging.WARNING, logger="llama4_deploy.runtime"):
        assert backends.choose(manifest, trt_available=False) == "onnxruntime"
        assert backends.choose(manifest, trt_available=False) == "onnxruntime"
    said = [r.getMessage() for r in caplog.records if "ONNX Runtime" in r.getMessage()]
    assert len(said) == 1 and "TensorRT is not installed" in said[0]


def test_tensorrt_picked_when_plans_and_tensorrt_exist(tmp_path):
    assert backends.choose(_manifest(tmp_path, plans=PLANS), trt_available=True) == "tensorrt"
    assert backends.choose(_manifest(tmp_path, plans=None), trt_available=True) == "onnxruntime"  # not compiled


@pytest.mark.parametrize("plans, available, message", [
    (None, True, "has no TensorRT plans yet; run llama4-deploy compile"),
    (PLANS, False, "needs TensorRT (pip install tensorrt"),
])
def test_tensorrt_requested_but_impossible(tmp_path, plans, available, message):
    with pytest.raises(BundleError, match=message.replace("(", r"\(")):
        backends.choose(_manifest(tmp_path, plans=plans), "tensorrt", trt_available=available)


def test_bf16_tensorrt_bundle_refused_on_onnxruntime_with_the_rebuild(tmp_path):
    with pytest.raises(BundleError, match="--target tensorrt --compute-dtype float16"):
        backends.choose(_manifest(tmp_path, compute="bfloat16"), trt_available=False)


def test_tensorrt_manifest_without_its_record(tmp_path):
    with pytest.raises(BundleError, match="no engine.tensorrt record"):
        backends.choose(_manifest(tmp_path, record=False), trt_available=False)
    with pytest.raises(ValueError, match="backend is 'cuda'"):
        backends.choose(_manifest(tmp_path), "cuda")


def test_plans_for_another_tensorrt_or_gpu_are_refused():
    tensorrt_backend.check_plans(PLANS, "10.15.1", "NVIDIA H200", "9.0", "b")
    for here in (("10.16.0", "NVIDIA H200", "9.0"), ("10.15.1", "NVIDIA H100 80GB HBM3", "9.0"),
                 ("10.15.1", "NVIDIA B200", "10.0")):
        with pytest.raises(BundleError, match="rebuild them here with llama4-deploy compile b$"):
            tensorrt_backend.check_plans(PLANS, *here, bundle="b")


def test_profile_chosen_by_cache_slots():
    profiles = [{"cache_slots": [16, 128]}, {"cache_slots": [129, 1024]}]
    assert [tensorrt_backend.profile_index(profiles, s) for s in (16, 128, 129, 1024)] == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="2048 slots"):
        tensorrt_backend.profile_index(profiles, 2048)


def test_copy_runs_group_consecutive_slots():
    rows, slots, steps = np.array([0, 0, 0, 1, 1, 1]), np.array([5, 6, 7, 7, 0, 1]), np.array([0, 1, 2, 0, 1, 2])
    assert tensorrt_backend.copy_runs(rows, slots, steps) == [(0, 5, 0, 3), (1, 7, 0, 1), (1, 0, 1, 2)]


class _HostCuda:
    """cudaMemcpy2DAsync / cudaMemsetAsync / cudaMalloc on host memory, per the CUDA runtime's documented
    semantics (height rows of width bytes, rows dpitch / spitch bytes apart), for checking offsets."""

    def __init__(self):
        self.keep = {}
        self.cudaError_t = types.SimpleNamespace(cudaSuccess=0)
        self.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyDeviceToDevice=3)

    def cudaMalloc(self, nbytes):
        array = np.zeros(nbytes, dtype=np.uint8)
        self.keep[array.ctypes.data] = array
        return 0, array.ctypes.data

    def cudaFree(self, ptr):
        self.keep.pop(ptr, None)
        return (0,)

    def cudaMemsetAsync(self, ptr, value, count, stream):
        ctypes.memset(ptr, value, count)
        return (0,)

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        assert width <= dpitch and width <= spitch
        for row in range(height):
            ctypes.memmove(dst + row * dpitch, src + row * spitch, width)
        return (0,)


def _host(buffer: tensorrt_backend.DeviceBuffer) -> np.ndarray:
    raw = (ctypes.c_uint8 * buffer.nbytes).from_address(buffer.ptr)
    return np.frombuffer(raw, dtype=buffer.dtype).reshape(buffer.shape).copy()


def test_device_storage_writes_what_host_storage_writes(monkeypatch):
    host_cuda = _HostCuda()
    monkeypatch.setattr(tensorrt_backend, "_cudart", lambda: host_cuda)
    device, host = tensorrt_backend.DeviceStorage(stream=0), HostStorage()
    B, K, S, D, T = 2, 3, 8, 4, 5
    rng = np.random.default_rng(0)
    new = rng.normal(size=(B, K, T, D)).astype(np.float32)
    new_device = tensorrt_backend.DeviceBuffer.empty(new.shape, new.dtype)
    ctypes.memmove(new_device.ptr, new.ctypes.data, new.nbytes)
    buf_device, buf_host = device.allocate((B, K, S, D), np.float32), host.allocate((B, K, S, D), np.float32)
    # row 0: a prefill run of 5 slots; row 1: a ring that wraps (slots 6, 7, 0) from steps 2..4
    rows, slots, steps = np.array([0] * 5 + [1] * 3), np.array([0, 1, 2, 3, 4, 6, 7, 0]), np.array([0, 1, 2, 3, 4, 2, 3, 4])
    device.scatter(buf_device, rows, slots, new_device, steps)
    host.scatter(buf_host, rows, slots, new, steps)
    np.testing.assert_array_equal(_host(buf_device), buf_host)
    grown_device, grown_host = device.grow(buf_device, 16), host.grow(buf_host, 16)
    np.testing.assert_array_equal(_host(grown_device), grown_host)


def test_device_buffer_leading_rows_view(monkeypatch):
    """The scheduler hands the engine cache[:rows]; a DeviceBuffer gives the same view in place."""
    host_cuda = _HostCuda()
    monkeypatch.setattr(tensorrt_backend, "_cudart", lambda: host_cuda)
    buffer = tensorrt_backend.DeviceBuffer.empty((4, 2, 8, 3), np.float32)
    view = buffer[:2]
    assert view.ptr == buffer.ptr and view.shape == (2, 2, 8, 3) and not view.owned
    with pytest.raises(TypeError, match="leading-row"):
        buffer[1:3]
