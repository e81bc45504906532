"""The TensorRT backend's parts that run without a GPU: backend choice, refusals, plan compatibility,
profile choice, the device cache writes' offsets (against HostStorage, on a host emulation of
cudaMemcpy2DAsync's documented semantics), and the pipeline's device plan on an emulation of several GPUs
(which device each stage's streams, cache buffers and hidden-state copies go to). The plans themselves need
a GPU: `gpu` / `tensorrt` tests."""

from __future__ import annotations

import ctypes
import logging
import types
from pathlib import Path

import numpy as np
import pytest

from llama4_deploy.runtime import abi, backends, tensorrt_backend
from llama4_deploy.runtime.bundle import BundleError, Manifest
from llama4_deploy.runtime.kv_cache import HostStorage


def _manifest(tmp_path: Path, backend="tensorrt", plans=None, compute="float32", record=True) -> Manifest:
    engine = {"backend": backend, "compute_dtype": compute, "graphs": {}}
    if record:
        engine["tensorrt"] = {"linted_for": "10.15", "profiles": {"gather.onnx": []}, "plans": plans}
    return Manifest({"name": "tiny", "engine": engine}, tmp_path)


PLANS = {
    "tensorrt_version": "10.15.1",
    "gpu": "NVIDIA H200",
    "compute_capability": "9.0",
    "files": {"gather.onnx": {"plan": "gather.plan"}},
}


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


@pytest.mark.parametrize(
    "plans, available, message",
    [
        (None, True, "has no TensorRT plans yet; run llama4-deploy compile"),
        (PLANS, False, "needs TensorRT (pip install tensorrt"),
    ],
)
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
    for here in (
        ("10.16.0", "NVIDIA H200", "9.0"),
        ("10.15.1", "NVIDIA H100 80GB HBM3", "9.0"),
        ("10.15.1", "NVIDIA B200", "10.0"),
    ):
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
    """The CUDA runtime calls the backend makes, on host memory, per their documented semantics (cudaMemcpy2DAsync:
    height rows of width bytes, rows dpitch / spitch bytes apart; cudaMalloc allocates on the current device; a
    stream belongs to the device current at its creation), with `devices` emulated GPUs. Every copy is logged with
    the devices it touches, and the calls CUDA requires on the right device are asserted to be there: the device
    plan is checked, not only the bytes."""

    def __init__(self, devices: int = 1, peer: bool = True):
        self.devices, self.peer_access = devices, peer
        self.current = 0
        self.keep = {}
        self.owner: dict[int, tuple[int, int]] = {}  # base pointer -> (device, bytes)
        self.stream_device: dict[int, int] = {}
        self.log: list[tuple] = []
        self.frees, self.wrong_device_frees = 0, []
        self.cudaError_t = types.SimpleNamespace(cudaSuccess=0, cudaErrorPeerAccessAlreadyEnabled=704)
        self.cudaMemcpyKind = types.SimpleNamespace(
            cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2, cudaMemcpyDeviceToDevice=3
        )

    def device_of(self, ptr: int) -> int:
        """The device whose allocation holds `ptr` (a base or an interior pointer)."""
        for base, (device, nbytes) in self.owner.items():
            if base <= ptr < base + nbytes:
                return device
        raise AssertionError(f"{ptr:#x} is not device memory")

    def _on_stream(self, stream: int) -> int:
        if stream == 0:  # the legacy default stream: the current device's
            return self.current
        assert self.stream_device[stream] == self.current, "a stream used while another device is current"
        return self.current

    def cudaGetDeviceCount(self):
        return 0, self.devices

    def cudaGetDevice(self):
        return 0, self.current

    def cudaSetDevice(self, device):
        assert 0 <= device < self.devices, f"cudaSetDevice({device}) with {self.devices} devices"
        self.current = device
        return (0,)

    def cudaStreamCreate(self):
        stream = 100 + len(self.stream_device)
        self.stream_device[stream] = self.current
        return 0, stream

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaStreamDestroy(self, stream):
        assert self.stream_device.pop(stream) == self.current, "a stream destroyed on another device"
        return (0,)

    def cudaDeviceCanAccessPeer(self, device, peer):
        return 0, int(self.peer_access)

    def cudaDeviceEnablePeerAccess(self, peer, flags):
        self.log.append(("enable_peer", self.current, peer))
        return (0,)

    def cudaMalloc(self, nbytes):
        array = np.zeros(nbytes, dtype=np.uint8)
        self.keep[array.ctypes.data] = array
        self.owner[array.ctypes.data] = (self.current, nbytes)
        return 0, array.ctypes.data

    def cudaFree(self, ptr):
        if ptr in self.owner and self.owner[ptr][0] != self.current:  # (raised inside __del__: recorded instead)
            self.wrong_device_frees.append(ptr)
        self.frees += 1
        self.keep.pop(ptr, None)
        self.owner.pop(ptr, None)
        return (0,)

    def cudaMemsetAsync(self, ptr, value, count, stream):
        assert self.device_of(ptr) == self._on_stream(stream)
        ctypes.memset(ptr, value, count)
        return (0,)

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        assert width <= dpitch and width <= spitch
        device = self._on_stream(stream)
        assert kind == 3 and self.device_of(dst) == self.device_of(src) == device  # a device's own memory
        for row in range(height):
            ctypes.memmove(dst + row * dpitch, src + row * spitch, width)
        self.log.append(("memcpy2d", device))
        return (0,)

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        device = self._on_stream(stream)
        if kind == 2:  # device to host: from this device's memory
            assert self.device_of(src) == device
            self.log.append(("to_host", device, count))
        else:
            assert kind == 1 and self.device_of(dst) == device
            self.log.append(("from_host", device, count))
        ctypes.memmove(dst, src, count)
        return (0,)

    def cudaMemcpyPeerAsync(self, dst, dst_device, src, src_device, count, stream):
        assert self.device_of(dst) == dst_device and self.device_of(src) == src_device
        self.log.append(("peer", dst_device, src_device, self._on_stream(stream), count))
        ctypes.memmove(dst, src, count)
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
    rows, slots, steps = (
        np.array([0] * 5 + [1] * 3),
        np.array([0, 1, 2, 3, 4, 6, 7, 0]),
        np.array([0, 1, 2, 3, 4, 2, 3, 4]),
    )
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


class _StagedManifest:
    """What KVCache reads, for a 2-stage split of 4 layers: stage 0 holds chunked layers 0-1 (C = 16), stage 1
    chunked layer 2 and global layer 3."""

    def __init__(self):
        from llama4_deploy.runtime.bundle import LayerCache

        self.model = {"num_kv_heads": 2, "head_dim": 4, "attention_chunk_size": 16}
        self.layers = [
            LayerCache(0, "chunked", 16),
            LayerCache(1, "chunked", 16),
            LayerCache(2, "chunked", 16),
            LayerCache(3, "global", None),
        ]
        self.max_context = 64
        self.engine = {"cache_dtype": "float32"}


def _on_device(cuda: _HostCuda, array: np.ndarray, device: int) -> tensorrt_backend.DeviceBuffer:
    buffer = tensorrt_backend.DeviceBuffer.empty(array.shape, array.dtype, device)
    ctypes.memmove(buffer.ptr, np.ascontiguousarray(array).ctypes.data, array.nbytes)
    return buffer


@pytest.mark.parametrize("peer", [True, False])
def test_stage_device_plan(monkeypatch, peer):
    """Two stages on cuda:0 and cuda:1: one stream per GPU, each layer's cache allocated, grown and written on
    its stage's GPU (and equal to the host cache after a prefill that grows the buffers and a decode step), and
    stage 0's hidden states handed to GPU 1 by one peer copy, or, without peer access, via the host."""
    from llama4_deploy.runtime.kv_cache import KVCache

    cuda = _HostCuda(devices=2, peer=peer)
    monkeypatch.setattr(tensorrt_backend, "_cudart", lambda: cuda)
    plan = tensorrt_backend.StagePlacement([range(0, 2), range(2, 4)], [0, 1])
    assert {cuda.stream_device[stream] for stream in plan.streams.values()} == {0, 1}
    assert cuda.stream_device[plan.streams[1]] == 1
    assert cuda.log == ([("enable_peer", 1, 0)] if peer else [])  # GPU 1 reads GPU 0's memory: the boundary
    manifest = _StagedManifest()
    device_cache, host_cache = KVCache(manifest, 2, plan.layer_storage), KVCache(manifest, 2)
    owners = {
        layer: {cuda.device_of(device_cache.keys[layer].ptr), cuda.device_of(device_cache.values[layer].ptr)}
        for layer in range(4)
    }
    assert owners == {0: {0}, 1: {0}, 2: {1}, 3: {1}}
    rng = np.random.default_rng(1)
    for tokens, start in ((20, 0), (1, 20)):  # a prefill past the 16-slot bucket (global buffers grow), a decode
        positions = np.tile(np.arange(start, start + tokens), (2, 1))
        positions[1, tokens // 2 :] = -1  # row 1 is shorter: padding is never written
        new = {name: rng.normal(size=(2, 2, tokens, 4)).astype(np.float32) for name in abi.present_names(range(4))}
        cuda.log.clear()
        device_cache.write(
            {name: _on_device(cuda, array, 0 if int(name[-1]) < 2 else 1) for name, array in new.items()}, positions
        )
        host_cache.write(new, positions)
        assert {entry[1] for entry in cuda.log if entry[0] == "memcpy2d"} == {0, 1}  # each GPU writes its own
    assert device_cache.grown == host_cache.grown == 1
    for layer in range(4):
        assert cuda.device_of(device_cache.keys[layer].ptr) == (0 if layer < 2 else 1)
        np.testing.assert_array_equal(_host(device_cache.keys[layer]), host_cache.keys[layer])
        np.testing.assert_array_equal(_host(device_cache.values[layer]), host_cache.values[layer])
    # the step's present buffers on GPU 0 were freed while GPU 1 was current: each on its own device, and the
    # current device restored after
    assert cuda.frees > 0 and cuda.wrong_device_frees == [] and cuda.current == 1
    hidden = rng.normal(size=(2, 5, 8)).astype(np.float32)  # [B, T, H] from stage 0
    cuda.log.clear()
    moved = plan.hand_off(_on_device(cuda, hidden, 0), 1)
    assert moved.device == 1 and cuda.device_of(moved.ptr) == 1
    np.testing.assert_array_equal(_host(moved), hidden)
    if peer:
        assert cuda.log == [("peer", 1, 0, 1, hidden.nbytes)]  # GPU 0 -> GPU 1 on GPU 1's stream
    else:
        assert cuda.log == [("to_host", 0, hidden.nbytes), ("from_host", 1, hidden.nbytes)]
    plan.close()
    assert cuda.stream_device == {} and plan.streams == {}  # each stream destroyed on its own device


def test_stages_on_one_gpu_share_its_stream_and_buffers(monkeypatch):
    cuda = _HostCuda(devices=1)
    monkeypatch.setattr(tensorrt_backend, "_cudart", lambda: cuda)
    plan = tensorrt_backend.StagePlacement([range(0, 2), range(2, 4)], [0, 0])
    assert len(plan.streams) == 1 and plan.layer_storage[0] is plan.layer_storage[3] and plan.peer == {}
    hidden = tensorrt_backend.DeviceBuffer.empty((1, 1, 8), np.float32, 0)
    cuda.log.clear()
    assert plan.hand_off(hidden, 1) is hidden and cuda.log == []  # no copy


def test_stage_on_a_missing_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(tensorrt_backend, "_cudart", lambda: _HostCuda(devices=2))
    with pytest.raises(BundleError, match=r"^stage 1 is placed on cuda:2, but this machine has 2 GPU\(s\)"):
        tensorrt_backend.StagePlacement([range(0, 2), range(2, 4)], [0, 2])
