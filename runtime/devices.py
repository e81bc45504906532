"""Where each pipeline stage runs: a stage -> device map, checked before anything is opened.

    load(bundle)                            onnxruntime: every stage on "cpu" (this machine)
                                            tensorrt:    stage s on "cuda:<engine.stages[s].device>"
                                                         (the build records device s for stage s)
    load(bundle, devices=["cuda:0", "cuda:1"])   one name per stage, in stage order

Names: "cpu", or "cuda:N" (N: the CUDA device ordinal, as CUDA_VISIBLE_DEVICES numbers them). On
ONNX Runtime a "cuda:N" stage's sessions use the CUDA execution provider with device_id N (the KV
cache stays in host memory and ONNX Runtime copies each stage's feeds to its GPU); the tensorrt
backend keeps each stage's plans, streams and cache buffers on its GPU (runtime/tensorrt_backend.py)
and takes only "cuda:N". Pure functions of the manifest and of what is installed: tested without a GPU.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

CPU, CUDA = "cpu", "cuda"
_NAME = re.compile(r"(cpu)|cuda:(\d+)")


@dataclasses.dataclass(frozen=True)
class Device:
    kind: str  # "cpu" or "cuda"
    index: int = 0  # CUDA device ordinal (0 for the CPU)

    def __str__(self) -> str:
        return CPU if self.kind == CPU else f"{CUDA}:{self.index}"


def parse(name: Any, what: str = "device") -> Device:
    """A device name ("cpu", "cuda:N") as a Device, or ValueError / TypeError in one sentence."""
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a device name such as 'cpu' or 'cuda:0', got {name!r}")
    match = _NAME.fullmatch(name.strip())
    if match is None:
        raise ValueError(f"{what} is {name!r}, which is not a device name; use 'cpu' or 'cuda:N' (N a GPU index)")
    return Device(CPU) if match.group(1) else Device(CUDA, int(match.group(2)))


def default_devices(manifest, backend: str) -> list[Device]:
    """The devices a bundle runs on when `load` is given none: the CPU for ONNX Runtime, the manifest's
    device per stage (stage s on GPU s unless the build said otherwise) for TensorRT."""
    if backend != "tensorrt":
        return [Device(CPU)] * len(manifest.stages)
    return [Device(CUDA, stage.device) for stage in manifest.stages]


def placement(manifest, backend: str, devices: Sequence[str] | str | None) -> list[Device]:
    """One Device per pipeline stage of `manifest` for `backend` (onnxruntime, tensorrt), from `devices`
    (None: default_devices; a list or tuple of names, one per stage; or a comma-separated string, the CLI's)."""
    if devices is None:
        return default_devices(manifest, backend)
    if isinstance(devices, str):
        devices = devices.split(",")
    if not isinstance(devices, (list, tuple)):
        raise TypeError(f"devices must be a list of device names, one per pipeline stage, got {devices!r}")
    stages = len(manifest.stages)
    if len(devices) != stages:
        raise ValueError(
            f"devices lists {len(devices)} device(s) but bundle {manifest.name} has {stages} pipeline "
            f"stage(s); give one device per stage, in stage order"
        )
    placed = [parse(name, f"the device of stage {s}") for s, name in enumerate(devices)]
    if backend == "tensorrt":
        cpu = [s for s, device in enumerate(placed) if device.kind == CPU]
        if cpu:
            raise ValueError(
                f"the tensorrt backend runs every stage on a GPU, but stage {cpu[0]} is placed on the cpu; "
                f"give cuda:N for it, or load with backend='onnxruntime' to run the graphs on the CPU"
            )
    return placed


def onnxruntime_providers(device: Device, available: Sequence[str] | None = None) -> list[Any]:
    """ONNX Runtime's execution providers for a stage on `device` (`available`: what this onnxruntime
    offers, default onnxruntime.get_available_providers()); one sentence when CUDA is asked of a build
    without it."""
    if device.kind == CPU:
        return ["CPUExecutionProvider"]
    if available is None:
        import onnxruntime  # deferred: importing the runtime (the CLI, the build) need not load ONNX Runtime

        available = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise ValueError(
            f"{device} was asked for, but this onnxruntime has no CUDAExecutionProvider (it offers "
            f"{', '.join(available)}); install onnxruntime-gpu on a machine with an NVIDIA GPU, or "
            f"place the stages on 'cpu'"
        )
    # the CPU provider takes what CUDA's does not implement (ONNX Runtime assigns nodes in provider order)
    return [("CUDAExecutionProvider", {"device_id": device.index}), "CPUExecutionProvider"]
