"""`llama4-deploy compile BUNDLE`: TensorRT plans for a TensorRT-form bundle, built on the GPU machine.

Plans are specific to a GPU and a TensorRT version, so they are built where they run. Per graph file
of the bundle, composed polygraphy loaders, each named and lazily evaluated:

    network = NetworkFromOnnxPath(graph, strongly_typed=True)    # precision from the graph's types and Q/DQ
    config  = CreateConfig(profiles=<engine.tensorrt.profiles[graph]>, load_timing_cache=timing.cache,
                           builder_optimization_level=N, progress_monitor=<stderr progress>)
    plan    = EngineBytesFromNetwork(network, config, save_timing_cache=timing.cache)

written as `<graph stem>.plan` (temp file, then rename), recorded in the manifest under
`engine.tensorrt.plans` with what TensorRT decided on: TensorRT version, GPU name, compute capability,
flags, optimization level, and each plan's SHA-256 (also in `files`, so `verify --files` and `load`
check them). The timing cache stays in the bundle, so a rebuild after a change re-times little.

Without TensorRT it refuses in one sentence before reading anything (exit 2, nothing written).
tensorrt is imported lazily, only here and in runtime/tensorrt_backend.py.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llama4_deploy.runtime.bundle import MANIFEST, read_manifest, write_manifest
from llama4_deploy.runtime.integrity import check_files, hash_files

TIMING_CACHE = "timing.cache"
DEFAULT_OPT_LEVEL = 3  # TensorRT's own default builder optimization level
INSTALL_HINT = (
    "TensorRT is not installed: run `pip install tensorrt cuda-python` (or `pip install "
    "'llama4-deploy[tensorrt]'`) on the machine with the NVIDIA GPU the plans are for, and run "
    "llama4-deploy compile there"
)


class CompileError(ValueError):
    """A bundle that cannot be compiled; one sentence."""


@dataclasses.dataclass
class CompileResult:
    bundle: Path
    plans: dict[str, str]  # graph file -> plan file
    seconds: float
    record: dict[str, Any]


def tensorrt_missing() -> str | None:
    """The sentence to print when TensorRT or the CUDA bindings cannot be imported, else None."""
    if importlib.util.find_spec("tensorrt") is None:
        return INSTALL_HINT
    if importlib.util.find_spec("cuda") is None:
        return (
            "cuda-python is not installed: run `pip install cuda-python` next to TensorRT (compile reads the "
            "GPU's name and compute capability with it)"
        )
    return None


def device_facts() -> dict[str, Any]:
    """Name and compute capability of CUDA device 0 (cuda-python's runtime API)."""
    from cuda.bindings import runtime as cudart  # deferred: cuda-python exists only on the GPU machine

    err, prop = cudart.cudaGetDeviceProperties(0)
    if err != cudart.cudaError_t.cudaSuccess:
        raise CompileError(f"no CUDA device could be queried ({err}); compile needs an NVIDIA GPU")
    name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
    return {
        "gpu": name.rstrip("\x00"),
        "compute_capability": f"{prop.major}.{prop.minor}",
        "memory_bytes": int(prop.totalGlobalMem),
        "memory_bus_bits": int(prop.memoryBusWidth),
    }


def plan_name(graph_file: str) -> str:
    return f"{Path(graph_file).stem}.plan"


def planned_files(record: dict[str, Any]) -> dict[str, str]:
    """{graph file: plan file} compile builds for an engine.tensorrt record: one plan per graph file with
    profiles, which is every graph of every pipeline stage (`stage<s>.<dispatch>.onnx` -> `.plan`)."""
    return {graph_file: plan_name(graph_file) for graph_file in record["profiles"]}


def _profiles(records: list[dict[str, Any]]):
    from polygraphy.backend.trt import Profile  # deferred: `compile` refuses without TensorRT before loading them

    out = []
    for record in records:
        profile = Profile()
        for name, dims in record["shapes"].items():
            profile.add(name, min=dims["min"], opt=dims["opt"], max=dims["max"])
        out.append(profile)
    return out


def _progress_monitor(log: Callable[[str], None]):
    """A trt.IProgressMonitor that prints each phase's start and its steps (at most every 2 s)."""
    import tensorrt as trt  # deferred: TensorRT exists only on the GPU machine

    class Progress(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.last = 0.0

        def phase_start(self, phase_name, parent_phase, num_steps):
            log(f"[compile] {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            now = time.time()
            if now - self.last > 2.0:
                self.last = now
                log(f"[compile]   {phase_name}: step {step + 1}")
            return True  # keep building

        def phase_finish(self, phase_name):
            pass

    return Progress()


def loaders(
    graph: Path, profiles: list[dict[str, Any]], timing_cache: Path, opt_level: int, log: Callable[[str], None]
):
    """(network, config, plan bytes) loaders for one graph: composed, nothing built until `plan()` is called."""
    # deferred: `compile` refuses without TensorRT before loading polygraphy's TensorRT loaders
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath

    network = NetworkFromOnnxPath(str(graph), strongly_typed=True)
    config = CreateConfig(
        profiles=_profiles(profiles),
        load_timing_cache=str(timing_cache),
        builder_optimization_level=opt_level,
        progress_monitor=_progress_monitor(log),
    )
    return network, config, EngineBytesFromNetwork(network, config, save_timing_cache=str(timing_cache))


def _read_bundle(bundle: Path):
    manifest = read_manifest(bundle)
    record = manifest.engine.get("tensorrt")
    if manifest.engine.get("backend") != "tensorrt" or not isinstance(record, dict) or not record.get("profiles"):
        raise CompileError(
            f"bundle {bundle} is not a TensorRT-form bundle; build it with llama4-deploy build --target tensorrt first"
        )
    return manifest, record


def compile_bundle(
    bundle: str | Path,
    opt_level: int = DEFAULT_OPT_LEVEL,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> CompileResult:
    """Build a plan per graph file of a TensorRT-form bundle and record them in its manifest."""
    missing = tensorrt_missing()
    if missing:
        raise CompileError(missing)
    if not isinstance(opt_level, int) or not 0 <= opt_level <= 5:
        raise CompileError(f"builder optimization level {opt_level!r} is outside TensorRT's 0 to 5")
    start = time.time()
    bundle = Path(bundle)
    manifest, record = _read_bundle(bundle)
    import tensorrt as trt  # deferred: TensorRT exists only on the GPU machine

    check_files(manifest)  # compile what the build wrote, not a changed copy
    facts = device_facts()
    log(
        f"[compile] TensorRT {trt.__version__} on {facts['gpu']} (compute capability {facts['compute_capability']}),"
        f" builder optimization level {opt_level}"
    )
    timing_cache = bundle / TIMING_CACHE
    written: dict[str, str] = {}
    temps: list[Path] = []
    try:
        for graph_file, plan in planned_files(record).items():
            profiles = record["profiles"][graph_file]
            log(f"[compile] {graph_file} -> {plan}: {len(profiles)} optimization profile(s)")
            t = time.time()
            _, _, build_plan = loaders(bundle / graph_file, profiles, timing_cache, opt_level, log)
            serialized = build_plan()
            temp = bundle / f".{plan}.tmp"
            temps.append(temp)
            with open(temp, "wb") as f:
                f.write(serialized)
            written[graph_file] = plan
            log(f"[compile] {plan}: {temp.stat().st_size / 1e6:.1f} MB in {time.time() - t:.1f}s")
        for plan in written.values():
            (bundle / f".{plan}.tmp").replace(bundle / plan)
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)
    raw = manifest.raw
    names = list(written.values()) + ([TIMING_CACHE] if timing_cache.is_file() else [])
    hashes = hash_files(bundle, names)
    raw["files"].update(hashes)
    raw["engine"]["tensorrt"]["plans"] = {
        "tensorrt_version": trt.__version__,
        "gpu": facts["gpu"],
        "compute_capability": facts["compute_capability"],
        "flags": ["STRONGLY_TYPED"],
        "builder_optimization_level": opt_level,
        "timing_cache": TIMING_CACHE if timing_cache.is_file() else None,
        "files": {graph: {"plan": plan, "sha256": hashes[plan]["sha256"]} for graph, plan in written.items()},
        "seconds": round(time.time() - start, 1),
    }
    with tempfile.TemporaryDirectory(dir=bundle, prefix=".manifest-") as staging:  # rename: never half-written
        write_manifest(staging, raw)
        (Path(staging) / MANIFEST).replace(bundle / MANIFEST)
    return CompileResult(bundle, written, time.time() - start, raw["engine"]["tensorrt"]["plans"])
