"""Which backend runs a bundle: `load(bundle, backend=None)` picks the best one available.

    bundle target   TensorRT importable, plans compiled   backend
    onnxruntime     -                                      onnxruntime
    tensorrt        yes                                    tensorrt (the plans, runtime/tensorrt_backend.py)
    tensorrt        no                                     onnxruntime on the bundle's ONNX graphs (the graphs
                                                           TensorRT compiles), said once; fp32 / fp16 only

Pure functions of the manifest and of what is installed, so they are tested without a GPU.
"""

from __future__ import annotations

import importlib.util
import logging

from llama4_deploy.runtime.bundle import BundleError

log = logging.getLogger("llama4_deploy.runtime")

BACKENDS = ("onnxruntime", "tensorrt")
_said: set[str] = set()  # bundles whose ONNX Runtime fallback was already reported


def tensorrt_importable() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def has_plans(engine: dict) -> bool:
    record = engine.get("tensorrt") or {}
    return bool(record.get("plans"))


def choose(manifest, requested: str | None = None, trt_available: bool | None = None) -> str:
    """The backend for `manifest`'s bundle, or BundleError (one sentence) for one that cannot run."""
    if requested is not None and requested not in BACKENDS:
        raise ValueError(f"backend is {requested!r}; choose one of {', '.join(BACKENDS)} or None (best available)")
    engine = manifest.engine
    target = engine.get("backend")
    if target not in BACKENDS:
        raise BundleError(
            f"bundle {manifest.name} targets {target}; this runtime runs onnxruntime and tensorrt bundles"
        )
    if target == "tensorrt" and not isinstance(engine.get("tensorrt"), dict):
        raise BundleError(
            f"bundle {manifest.name} targets tensorrt but its manifest has no engine.tensorrt record "
            f"(profiles), so build --target tensorrt did not write it; rebuild it, or with --target "
            f"onnxruntime"
        )
    available = tensorrt_importable() if trt_available is None else trt_available
    if requested == "tensorrt" or (requested is None and target == "tensorrt" and available and has_plans(engine)):
        if target != "tensorrt":
            raise BundleError(
                f"bundle {manifest.name} is an ONNX Runtime bundle; build it with --target tensorrt and "
                f"run llama4-deploy compile on it to run it on TensorRT"
            )
        if not has_plans(engine):
            raise BundleError(
                f"bundle {manifest.name} has no TensorRT plans yet; run llama4-deploy compile "
                f"{manifest.path} on the GPU machine first"
            )
        if not available:
            raise BundleError(
                "the tensorrt backend needs TensorRT (pip install tensorrt on a machine with an NVIDIA "
                "GPU); without it, load(..., backend=None) runs the bundle's ONNX graphs on ONNX Runtime"
            )
        return "tensorrt"
    check_onnxruntime_dtype(manifest)
    if target == "tensorrt" and str(manifest.path) not in _said:
        _said.add(str(manifest.path))
        why = "TensorRT is not installed" if not available else "the bundle has no compiled plans"
        log.warning("%s: running the TensorRT-form ONNX graphs on ONNX Runtime (%s)", manifest.name, why)
    return "onnxruntime"


def check_onnxruntime_dtype(manifest) -> None:
    """ONNX Runtime's CPU has no bfloat16 kernels: refuse such a bundle in one sentence."""
    if manifest.engine.get("compute_dtype") != "bfloat16":
        return
    if manifest.engine.get("backend") == "tensorrt":
        raise BundleError(
            f"bundle {manifest.name} computes in bfloat16, which ONNX Runtime's CPU cannot run; compile "
            f"it with llama4-deploy compile on a GPU machine, or rebuild it with --target tensorrt "
            f"--compute-dtype float16 (or float32) to run its graphs here"
        )
    raise BundleError(
        f"bundle {manifest.name} computes in bfloat16, which ONNX Runtime's CPU cannot run; "
        "rebuild it with --precision fp16 or fp32 to run it here (bf16 bundles are for TensorRT)"
    )
