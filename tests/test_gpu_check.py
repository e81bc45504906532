"""`make gpu-check`'s CPU side (prepare: TensorRT-form bundles and their CPU reference logits), its
comparator, and its refusal without TensorRT. The GPU side runs with `make gpu-check`."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from llama4_deploy.runtime import load
from llama4_deploy.runtime.bundle import BundleError
from tests.conftest import manifest
from tools import gpu_check


def test_prepare_tiny_bf16(tmp_path):
    """The bundle gpu-check compiles: bf16 compute by default for --target tensorrt, lint-clean (the build
    ran lint_tensorrt), no golden (ONNX Runtime cannot run bf16), and a reference from the fp32 model."""
    prepared = gpu_check.prepare(tmp_path, models=("tiny",), precisions=("bf16",), log=lambda _: None)
    assert [p.name for p in prepared] == ["tiny-bf16"]
    m = manifest(prepared[0].bundle)
    assert m["engine"]["backend"] == "tensorrt" and m["engine"]["compute_dtype"] == "bfloat16"
    assert m["engine"]["cache_dtype"] == "bfloat16" and m["golden"] is None
    assert m["engine"]["tensorrt"]["linted_for"] == "10.15" and m["engine"]["tensorrt"]["plans"] is None
    reference = np.load(prepared[0].reference)
    assert reference["logits"].shape == (gpu_check.PROMPT_TOKENS, m["model"]["vocab_size"])
    assert np.isfinite(reference["logits"]).all() and np.abs(reference["logits"]).max() > 1
    with pytest.raises(BundleError, match="--target tensorrt --compute-dtype float16"):
        load(prepared[0].bundle)
    assert gpu_check.prepare(tmp_path, models=("tiny",), precisions=("bf16",), log=lambda _: None)  # reused


def test_comparator_passes_and_fails(capsys):
    expected = np.random.default_rng(0).normal(0, 10, (8, 32)).astype(np.float32)
    said = []
    assert gpu_check._compare("x", expected + 1e-3, expected, said.append)
    assert not gpu_check._compare("x", expected + 3.0, expected, said.append)  # 3 > 5e-2 x max |logit| (~1.6)
    assert "ok" in said[0] and "FAIL" in said[1]


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_run_without_tensorrt_exits_2(tmp_path):
    assert gpu_check.run(tmp_path) == 2
    log = (tmp_path / gpu_check.LOG).read_text()
    assert log.startswith("error: TensorRT is not installed") and not (tmp_path / "tiny-bf16").exists()


def test_reference_is_the_whole_model_simulation(tmp_path):
    """The reference gpu-check compares against runs layer by layer: it equals the whole-model fake-quant
    simulation (same transformers modules, same ops, same order, fp32) on a tiny int4 TensorRT-form bundle."""
    from llama4_deploy.build import build
    from llama4_deploy.export.reference import reference_logits, reference_model
    from llama4_deploy.export.simulate import simulate
    from llama4_deploy.graphs.quantize import QuantSpec
    from llama4_deploy.runtime.bundle import read_manifest

    bundle = build(
        "tiny", out=tmp_path / "b", target="tensorrt", precision="int4", compute_dtype="float32", log=lambda _: None
    ).bundle
    ids = list(range(3, 3 + gpu_check.PROMPT_TOKENS))
    m = read_manifest(bundle)
    whole = reference_model(m.raw["source"])
    simulate(whole, QuantSpec.model_validate(m.engine["quantization"]), None)
    want = reference_logits(whole, ids)
    got = gpu_check.reference_logits_for(bundle, ids)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    plain = reference_logits(reference_model(m.raw["source"]), ids)
    assert np.abs(plain - want).max() > 100 * 1e-5 * np.abs(want).max()  # the simulation is applied: it moves them
