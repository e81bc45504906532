"""TensorRT backend: plans compiled by `llama4-deploy compile`, device-resident KV caches, a CUDA stream per GPU.

NOT YET RUN AGAINST TENSORRT OR ON A GPU: written against TensorRT 10's Python API and cuda-python's
runtime bindings as documented; the CPU tests cover the pure parts (plan compatibility, profile choice,
run coalescing of cache writes) and, on a host emulation of the CUDA runtime calls used here, the cache
writes' offsets and the per-stage device plan. Letters: B rows, K kv heads, S cache slots, T new tokens,
D head_dim, H hidden size.

    runner = TensorRTRunner(plan, profiles, stream).activate()
    outputs = runner.infer(feeds)     # same surface as OnnxRuntimeRunner

- feeds: `input_ids`, `position_ids`, `past_lengths` as host numpy arrays (copied to the device each
  step, a few hundred bytes), `past_key.l` / `past_value.l` as DeviceBuffers the KV cache owns (fed in
  place: the cache never leaves the device).
- the optimization profile is chosen per step: the one whose cache range holds the step's global-cache
  slot count S (trt_profiles.py wrote the ranges; `profile_index`).
- outputs: `logits` [B, T, V] and `moe_overflow` copied to the host; `present_key.l` / `present_value.l`
  [B, K, T, D] stay on the device, and `DeviceStorage.scatter` writes them into the cache buffers with
  device-to-device copies (one 2-D copy per run of consecutive slots: one per row for a prefill step).
- pipeline stages (`StagePlacement`): stage s runs on its GPU (runtime/devices.py: stage s on cuda:s by
  default): its plans are deserialized there, its layers' cache buffers are allocated there, and each GPU
  has one stream that all its stages' runs, cache writes and incoming copies use. Stage s's
  `hidden_states_out` [B, T, H] reaches stage s+1's GPU by one cudaMemcpyPeerAsync where
  cudaDeviceCanAccessPeer allows direct access (enabled once at load), else through host memory (device
  to host on stage s's stream, then host to device on stage s+1's); two stages on one GPU share the
  buffer. Every runner waits for its stream after a run (for its logits, overflow flag, or the hidden
  states the next stage takes), so a copy never races the run that wrote it.

Plans are refused when built by another TensorRT version or for another GPU (`check_plans`), in one
sentence that says how to rebuild them. tensorrt and cuda-python are imported lazily.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from llama4_deploy.runtime import abi
from llama4_deploy.runtime.bundle import BundleError


# -- pure functions (tested without a GPU) --------------------------------------------------------
def check_plans(plans: dict[str, Any], tensorrt_version: str, gpu: str, compute_capability: str, bundle: str) -> None:
    """Refuse plans built elsewhere: TensorRT plans are specific to a TensorRT version and a GPU."""
    built = (plans.get("tensorrt_version"), plans.get("gpu"), plans.get("compute_capability"))
    here = (tensorrt_version, gpu, compute_capability)
    if built != here:
        raise BundleError(
            f"the plans in {bundle} were built with TensorRT {built[0]} for {built[1]} (compute capability "
            f"{built[2]}), but this machine has TensorRT {here[0]} and {here[1]} (compute capability {here[2]}); "
            f"rebuild them here with llama4-deploy compile {bundle}"
        )


def profile_index(profiles: list[dict[str, Any]], slots: int) -> int:
    """The profile whose cache range holds `slots` (the step's global-cache bucket, or ring slots when
    every layer is chunked)."""
    for index, profile in enumerate(profiles):
        low, high = profile["cache_slots"]
        if low <= slots <= high:
            return index
    raise ValueError(
        f"no optimization profile covers a cache of {slots} slots (ranges {[p['cache_slots'] for p in profiles]})"
    )


def copy_runs(rows: np.ndarray, slots: np.ndarray, steps: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(row, first slot, first step, length) runs with consecutive slots and steps in one row, in order:
    the cache writes `buffer[row, :, slot] = new[row, :, step]` grouped into as few 2-D copies as possible."""
    runs: list[list[int]] = []
    for row, slot, step in zip(rows.tolist(), slots.tolist(), steps.tolist()):
        if runs and runs[-1][0] == row and runs[-1][1] + runs[-1][3] == slot and runs[-1][2] + runs[-1][3] == step:
            runs[-1][3] += 1
        else:
            runs.append([row, slot, step, 1])
    return [tuple(run) for run in runs]


def cache_slots(feeds: dict[str, Any], layers: list[dict[str, Any]]) -> int:
    """S of a step: the slot count of a global layer's cache feed, else of a chunked one's."""
    glob = [layer for layer in layers if layer["attention"] == "global"] or layers
    return int(feeds[abi.past_key(glob[0]["index"])].shape[2])


# -- device memory (cuda-python) ----------------------------------------------------------------
def _cudart():
    from cuda.bindings import runtime as cudart  # deferred: cuda-python exists only on a GPU machine

    return cudart


def _check(result, what: str):
    cudart = _cudart()
    err = result[0] if isinstance(result, tuple) else result
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA call {what} failed: {err}")
    return result[1] if isinstance(result, tuple) and len(result) > 1 else None


@dataclasses.dataclass
class DeviceBuffer:
    """A device allocation seen as an array of `shape` and `dtype` (freed when collected)."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    owned: bool = True
    device: int = 0  # the CUDA device ordinal the memory is on

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @classmethod
    def empty(cls, shape, dtype, device: int = 0) -> DeviceBuffer:
        dtype = np.dtype(dtype)
        nbytes = max(1, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
        _set_device(device)  # cudaMalloc allocates on the current device
        return cls(int(_check(_cudart().cudaMalloc(nbytes), "cudaMalloc")), tuple(shape), dtype, device=device)

    def __getitem__(self, index: slice) -> DeviceBuffer:
        """buffer[:rows]: the leading rows, in place (the scheduler's view of a cache's rows in use)."""
        if not isinstance(index, slice) or index.start not in (None, 0) or index.step not in (None, 1):
            raise TypeError("a DeviceBuffer takes only leading-row slices, buffer[:rows]")
        rows = min(self.shape[0], self.shape[0] if index.stop is None else index.stop)
        return DeviceBuffer(self.ptr, (rows,) + self.shape[1:], self.dtype, owned=False, device=self.device)

    def __del__(self):
        if self.owned and self.ptr:
            try:  # freed on its own device; the current device is restored (collection happens at any time)
                cudart = _cudart()
                current = cudart.cudaGetDevice()[1]
                if current != self.device:
                    cudart.cudaSetDevice(self.device)
                cudart.cudaFree(self.ptr)
                if current != self.device:
                    cudart.cudaSetDevice(current)
            except Exception:  # interpreter shutdown
                pass
            self.ptr = 0


def _set_device(device: int) -> None:
    _check(_cudart().cudaSetDevice(device), "cudaSetDevice")


class DeviceStorage:
    """KV cache buffers in one GPU's memory (runtime/kv_cache.py's CacheStorage), on that GPU's stream."""

    def __init__(self, stream: int, device: int = 0):
        self.stream, self.device = stream, device

    def allocate(self, shape, dtype) -> DeviceBuffer:
        buffer = DeviceBuffer.empty(shape, dtype, self.device)
        _check(_cudart().cudaMemsetAsync(buffer.ptr, 0, buffer.nbytes, self.stream), "cudaMemsetAsync")
        return buffer

    def grow(self, buffer: DeviceBuffer, slots: int) -> DeviceBuffer:
        B, K, S, D = buffer.shape
        grown = self.allocate((B, K, slots, D), buffer.dtype)  # leaves self.device current
        row = D * buffer.dtype.itemsize
        # every [b, k] row of S slots moves to a row of `slots` slots: one 2-D copy of B*K rows
        _check(
            _cudart().cudaMemcpy2DAsync(
                grown.ptr,
                slots * row,
                buffer.ptr,
                S * row,
                S * row,
                B * K,
                _cudart().cudaMemcpyKind.cudaMemcpyDeviceToDevice,
                self.stream,
            ),
            "cudaMemcpy2DAsync",
        )
        return grown

    def scatter(self, buffer: DeviceBuffer, rows, slots, new: DeviceBuffer, steps) -> None:
        """buffer[r, :, s] = new[r, :, t]: per run of consecutive slots, K rows of `length * D` elements."""
        B, K, S, D = buffer.shape
        T = new.shape[2]
        item = buffer.dtype.itemsize
        cudart = _cudart()
        _set_device(self.device)
        for row, slot, step, length in copy_runs(np.asarray(rows), np.asarray(slots), np.asarray(steps)):
            dst = buffer.ptr + ((row * K) * S + slot) * D * item
            src = new.ptr + ((row * K) * T + step) * D * item
            _check(
                cudart.cudaMemcpy2DAsync(
                    dst,
                    S * D * item,
                    src,
                    T * D * item,
                    length * D * item,
                    K,
                    cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
                    self.stream,
                ),
                "cudaMemcpy2DAsync",
            )


# -- the runner -----------------------------------------------------------------------------------
def _numpy_dtype(trt_dtype) -> np.dtype:
    import tensorrt as trt  # deferred: TensorRT exists only on a GPU machine

    if trt_dtype == trt.DataType.BF16:
        import ml_dtypes  # deferred: the tensorrt extra brings it, the runtime's dependencies do not

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(trt.nptype(trt_dtype))


class TensorRTRunner:
    """One plan: activate / infer / deactivate, the surface of OnnxRuntimeRunner."""

    def __init__(
        self,
        plan_path: str | Path,
        profiles: list[dict[str, Any]],
        layers: list[dict[str, Any]],
        stream: int,
        device: int = 0,
    ):
        self.plan_path = Path(plan_path)
        # layers: the plan's own (its stage's); stream: its device's
        self.profiles, self.layers, self.stream, self.device = profiles, layers, stream, device
        self.engine = self.context = None
        self.inputs: dict[str, np.dtype] = {}
        self.outputs: dict[str, np.dtype] = {}
        self._device: dict[str, DeviceBuffer] = {}  # staging for host inputs and every output, by name
        self._profile = -1

    def activate(self) -> TensorRTRunner:
        import tensorrt as trt  # deferred: TensorRT exists only on a GPU machine

        _set_device(self.device)  # an engine and its contexts live on the device current at deserialization
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self.engine is None:
            raise BundleError(
                f"{self.plan_path} cannot be deserialized by this TensorRT; rebuild it with "
                f"llama4-deploy compile {self.plan_path.parent}"
            )
        self.context = self.engine.create_execution_context()
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            kind = self.inputs if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else self.outputs
            kind[name] = _numpy_dtype(self.engine.get_tensor_dtype(name))
        return self

    def deactivate(self) -> None:
        self.context = self.engine = None
        self._device.clear()

    def __enter__(self) -> TensorRTRunner:
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def validate(self, feeds: dict[str, Any]) -> None:
        missing, extra = set(self.inputs) - set(feeds), set(feeds) - set(self.inputs)
        if missing or extra:
            raise ValueError(
                f"feeds do not match the plan's inputs (missing {sorted(missing)}, unknown {sorted(extra)})"
            )
        for name, value in feeds.items():
            if np.dtype(value.dtype) != self.inputs[name]:
                raise ValueError(f"input {name} is {value.dtype}, the plan declares {self.inputs[name]}")

    def _staging(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> DeviceBuffer:
        buffer = self._device.get(name)
        if buffer is None or buffer.nbytes < int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            buffer = DeviceBuffer.empty(shape, dtype, self.device)
            self._device[name] = buffer
        return DeviceBuffer(buffer.ptr, tuple(shape), dtype, owned=False, device=self.device)  # this step's shape

    def infer(self, feeds: dict[str, Any]) -> dict[str, Any]:
        if self.context is None:
            raise RuntimeError("runner is not active; use it as a context manager or call activate()")
        self.validate(feeds)
        cudart = _cudart()
        _set_device(self.device)
        index = profile_index(self.profiles, cache_slots(feeds, self.layers))
        if index != self._profile:
            self.context.set_optimization_profile_async(index, self.stream)
            self._profile = index
        for name, value in feeds.items():
            self.context.set_input_shape(name, tuple(value.shape))
            if isinstance(value, DeviceBuffer):
                if value.device != self.device:
                    raise ValueError(f"input {name} is on cuda:{value.device}, the plan runs on cuda:{self.device}")
                self.context.set_tensor_address(name, value.ptr)
                continue
            host = np.ascontiguousarray(value)
            staged = self._staging(name, host.shape, host.dtype)
            _check(
                cudart.cudaMemcpyAsync(
                    staged.ptr, host.ctypes.data, host.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream
                ),
                "cudaMemcpyAsync",
            )
            self.context.set_tensor_address(name, staged.ptr)
        outputs: dict[str, Any] = {}
        for name, dtype in self.outputs.items():
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = self._staging(f"out:{name}", shape, dtype)
            self.context.set_tensor_address(name, outputs[name].ptr)
        if not self.context.execute_async_v3(self.stream):
            raise RuntimeError(f"TensorRT failed to run {self.plan_path.name}")
        for name in (abi.LOGITS, abi.MOE_OVERFLOW):
            if name in outputs:
                device = outputs[name]
                host = np.empty(device.shape, dtype=device.dtype)
                _check(
                    cudart.cudaMemcpyAsync(
                        host.ctypes.data,
                        device.ptr,
                        host.nbytes,
                        cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                        self.stream,
                    ),
                    "cudaMemcpyAsync",
                )
                outputs[name] = host
        _check(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        if abi.LOGITS in outputs:
            outputs[abi.LOGITS] = outputs[abi.LOGITS].astype(np.float32)  # the runtime samples in float32
        return outputs


def installed_facts(device: int = 0) -> tuple[str, str, str]:
    """(TensorRT version, GPU name, compute capability) of CUDA device `device` of this machine."""
    import tensorrt as trt  # deferred: TensorRT exists only on a GPU machine

    cudart = _cudart()
    prop = _check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
    return trt.__version__, name.rstrip("\x00"), f"{prop.major}.{prop.minor}"


def _enable_peer(device: int, peer: int) -> bool:
    """Whether `device` can read `peer`'s memory directly; if so, access is enabled (once per pair)."""
    cudart = _cudart()
    if not _check(cudart.cudaDeviceCanAccessPeer(device, peer), "cudaDeviceCanAccessPeer"):
        return False
    _set_device(device)
    result = cudart.cudaDeviceEnablePeerAccess(peer, 0)
    err = result[0] if isinstance(result, tuple) else result
    if err not in (cudart.cudaError_t.cudaSuccess, cudart.cudaError_t.cudaErrorPeerAccessAlreadyEnabled):
        raise RuntimeError(f"CUDA call cudaDeviceEnablePeerAccess failed: {err}")
    return True


class StagePlacement:
    """The device plan of a pipeline: stage s on GPU devices[s]. One stream per GPU, the cache storage of
    each layer on its stage's GPU (`layer_storage`, what KVCache takes), and `hand_off`, which brings
    stage s's hidden states to stage s+1's GPU."""

    def __init__(self, stage_layers: list[range], devices: list[int]):
        cudart = _cudart()
        count = int(_check(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount"))
        for stage, device in enumerate(devices):
            if not 0 <= device < count:
                raise BundleError(
                    f"stage {stage} is placed on cuda:{device}, but this machine has {count} GPU(s) "
                    f"(cuda:0 to cuda:{count - 1}); pass load(..., devices=[...]) with one of them"
                )
        self.devices = list(devices)
        self.streams: dict[int, int] = {}
        for device in dict.fromkeys(self.devices):
            _set_device(device)  # a stream belongs to the device current at its creation
            self.streams[device] = int(_check(cudart.cudaStreamCreate(), "cudaStreamCreate"))
        self.storages = {device: DeviceStorage(stream, device) for device, stream in self.streams.items()}
        self.layer_storage = {
            layer: self.storages[device] for layers, device in zip(stage_layers, self.devices) for layer in layers
        }
        # (destination, source) -> direct peer access, for each stage boundary that crosses GPUs
        self.peer = {
            (dst, src): _enable_peer(dst, src) for src, dst in zip(self.devices, self.devices[1:]) if src != dst
        }
        self._inputs: dict[int, DeviceBuffer] = {}  # stage -> its hidden_states buffer on its GPU
        self._host: dict[int, np.ndarray] = {}  # stage -> host bounce buffer (no peer access)

    def hand_off(self, hidden: DeviceBuffer, stage: int) -> DeviceBuffer:
        """Stage `stage`'s hidden_states [B, T, H]: the previous stage's output, on this stage's GPU. The
        previous stage's run has finished (its runner waited for its stream)."""
        dst, src = self.devices[stage], hidden.device
        if dst == src:
            return hidden  # same GPU, same stream: the next run reads it in place
        cudart = _cudart()
        kept = self._inputs.get(stage)
        if kept is None or kept.nbytes < hidden.nbytes:
            kept = self._inputs[stage] = DeviceBuffer.empty(hidden.shape, hidden.dtype, dst)
        target = DeviceBuffer(kept.ptr, hidden.shape, hidden.dtype, owned=False, device=dst)
        if self.peer[(dst, src)]:
            _set_device(dst)
            _check(
                cudart.cudaMemcpyPeerAsync(target.ptr, dst, hidden.ptr, src, hidden.nbytes, self.streams[dst]),
                "cudaMemcpyPeerAsync",
            )
            return target
        host = self._host.get(stage)
        if host is None or host.nbytes < hidden.nbytes:
            host = self._host[stage] = np.empty(hidden.nbytes, dtype=np.uint8)
        _set_device(src)
        _check(
            cudart.cudaMemcpyAsync(
                host.ctypes.data,
                hidden.ptr,
                hidden.nbytes,
                cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                self.streams[src],
            ),
            "cudaMemcpyAsync",
        )
        _check(cudart.cudaStreamSynchronize(self.streams[src]), "cudaStreamSynchronize")
        _set_device(dst)
        _check(
            cudart.cudaMemcpyAsync(
                target.ptr,
                host.ctypes.data,
                hidden.nbytes,
                cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
                self.streams[dst],
            ),
            "cudaMemcpyAsync",
        )
        return target

    def close(self) -> None:
        """Destroy the streams (after waiting for them) and drop the hand-off buffers."""
        cudart = _cudart()
        for device, stream in self.streams.items():
            _set_device(device)
            _check(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
            _check(cudart.cudaStreamDestroy(stream), "cudaStreamDestroy")
        self.streams.clear()
        self._inputs.clear()
        self._host.clear()


def open_plans(manifest, devices: list[int] | None = None) -> tuple[dict[str, TensorRTRunner], StagePlacement]:
    """A runner per graph file (keyed like the ONNX Runtime runners), each on its stage's GPU (`devices`:
    one CUDA ordinal per stage, default stage s on its manifest device), and the stages' device plan."""
    record = manifest.engine["tensorrt"]
    plans = record["plans"]
    stages = manifest.stages
    devices = [stage.device for stage in stages] if devices is None else list(devices)
    placement = StagePlacement([stage.layers for stage in stages], devices)
    for device in dict.fromkeys(devices):  # each GPU the stages use must be the one the plans were built for
        check_plans(plans, *installed_facts(device), bundle=str(manifest.path))
    layers = manifest.raw["layers"]
    runners = {}
    for stage, device in zip(stages, devices):
        own = [layer for layer in layers if stage.start <= layer["index"] < stage.stop]
        for graph_file in dict.fromkeys(graph["file"] for graph in stage.graphs.values()):
            plan = plans["files"].get(graph_file)
            path = manifest.path / plan["plan"] if plan else None
            if path is None or not path.is_file():
                raise BundleError(
                    f"bundle {manifest.path} has no plan for {graph_file} on disk; rebuild the plans "
                    f"with llama4-deploy compile {manifest.path}"
                )
            runners[graph_file] = TensorRTRunner(
                path, record["profiles"][graph_file], own, placement.streams[device], device
            ).activate()
    return runners, placement
