"""`llama4-deploy compile`: the refusal where TensorRT is absent (fast, one sentence, nothing written),
and, on a machine with TensorRT and a GPU, real plans (marked; skipped here with the reason)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
CLI = str(Path(sys.executable).parent / "llama4-deploy")


def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")}


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here, so compile does not refuse")
def test_compile_refuses_fast_without_tensorrt(tiny_bundle):
    before = _snapshot(tiny_bundle)
    start = time.monotonic()
    result = subprocess.run([CLI, "compile", str(tiny_bundle)], capture_output=True, text=True, timeout=30)
    seconds = time.monotonic() - start
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: TensorRT is not installed"), result.stderr
    assert "pip install tensorrt" in lines[0] and "NVIDIA GPU" in lines[0]
    assert result.stdout == ""
    assert seconds < 2.0, f"compile took {seconds:.2f}s to refuse"  # the whole process, interpreter start included
    assert _snapshot(tiny_bundle) == before  # nothing written


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TENSORRT, reason="needs TensorRT and an NVIDIA GPU (pip install tensorrt cuda-python)")
def test_compile_and_run_plans(tmp_path):
    """Compile tiny's TensorRT-form bundle at float32 and compare the plans' logits with ONNX Runtime's
    on the same graphs (float32 on both: 1e-3 x max |logit|, as the parity tests' bound)."""
    import numpy as np

    from llama4_deploy.build import build
    from llama4_deploy.runtime import load
    from llama4_deploy.targets.tensorrt_compile import compile_bundle

    bundle = build("tiny", out=tmp_path / "tiny", target="tensorrt", compute_dtype="float32", log=lambda _: None).bundle
    ids = list(range(1, 40))
    with load(bundle, backend="onnxruntime") as engine:
        expected = engine.score(ids)
    compile_bundle(bundle, log=lambda _: None)
    with load(bundle) as engine:
        assert engine.backend == "tensorrt"
        got = engine.score(ids)
    np.testing.assert_allclose(got, expected, atol=1e-3 * max(1.0, float(np.abs(expected).max())), rtol=0)


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TENSORRT, reason="needs TensorRT and an NVIDIA GPU (pip install tensorrt cuda-python)")
def test_compile_builds_the_vision_plans(tmp_path):
    """compile on the TensorRT-form tiny-vision builds the vision graph's, the embedding step's and the embeddings
    prefill graphs' plans with the text plans; the vision plan run by polygraphy's TrtRunner (tiles 1 and 5, inside
    its profile 1 .. 10) gives ONNX Runtime's features on the same graph (float32 on both: 1e-3 x max |feature|).
    The tensorrt runtime backend does not run images itself yet (it refuses them in one sentence)."""
    import numpy as np
    import onnxruntime as ort
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    from llama4_deploy.build import build
    from llama4_deploy.targets.tensorrt_compile import compile_bundle

    bundle = build(
        "tiny-vision", out=tmp_path / "tv", target="tensorrt", compute_dtype="float32", log=lambda _: None
    ).bundle
    result = compile_bundle(bundle, log=lambda _: None)
    assert {"vision.onnx", "embed.onnx", "embeds.capacity.onnx"} <= set(result.plans)
    session = ort.InferenceSession(str(bundle / "vision.onnx"), providers=["CPUExecutionProvider"])
    with TrtRunner(EngineFromBytes((bundle / result.plans["vision.onnx"]).read_bytes())) as runner:
        for tiles in (1, 5):
            pixels = np.random.default_rng(tiles).uniform(-1, 1, (tiles, 3, 56, 56)).astype(np.float32)
            want = session.run(None, {"pixel_values": pixels})[0]
            got = runner.infer({"pixel_values": pixels})["image_features"]
            np.testing.assert_allclose(got, want, atol=1e-3 * max(1.0, float(np.abs(want).max())), rtol=0)
