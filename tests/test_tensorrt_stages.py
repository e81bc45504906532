"""TensorRT-form bundles in pipeline stages (`build --target tensorrt --stages 2`), run here on ONNX Runtime
(the runtime's fallback for TensorRT-form bundles without TensorRT): maverick-mini in 2 stages computes what
its one-stage TensorRT-form build computes, on the prefill and the decode path, with identical greedy tokens;
every stage graph is in the TensorRT form and passes the TensorRT lint; each stage graph file has its own
optimization profiles; and the stage -> device map is checked at load and on the CLI.

Tolerance: max |dlogit| <= 1e-5 x max(1, max |logit|), as tests/test_stages.py: both sides are the same
fp32 graphs cut at a layer boundary, so only ONNX Runtime's fusions inside one graph (a residual Add folded
into the next RMS norm) may round differently, by an ulp of the residual sum (a few 1e-6 at logits of ~30);
a layer run twice or skipped, or a cache fed to the wrong stage, moves logits by whole units.
"""

from __future__ import annotations

import numpy as np
import pytest

from llama4_deploy.runtime import abi
from tests.conftest import manifest, opened_engines, quiet_build, recipe_checkpoint
from tests.test_cli import invoke, user_error

REL_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """maverick-mini's TensorRT form at float32 compute in 1 and 2 stages, from one written checkpoint."""
    root = tmp_path_factory.mktemp("trt-stages")
    ckpt = recipe_checkpoint("maverick-mini", root / "ckpt")
    trt = dict(checkpoint=ckpt, target="tensorrt", compute_dtype="float32")
    return {n: quiet_build("maverick-mini", root / f"s{n}", stages=n, **trt) for n in (1, 2)}


@pytest.fixture(scope="module")
def engines(bundles):
    yield from opened_engines(bundles)


def test_every_stage_graph_is_in_the_tensorrt_form_with_its_own_profiles(bundles):
    import onnx
    import onnx_ir as ir

    from llama4_deploy.graphs.lint_tensorrt import lint_tensorrt
    from llama4_deploy.targets.tensorrt import topk_bound
    from llama4_deploy.targets.tensorrt_compile import planned_files

    m = manifest(bundles[2])
    engine = m["engine"]
    assert engine["backend"] == "tensorrt" and engine["compute_dtype"] == "float32"
    stages = engine["stages"]
    assert [s["layers"] for s in stages] == [[0, 2], [2, 4]] and [s["device"] for s in stages] == [0, 1]
    assert {role: g["moe_dispatch"] for role, g in engine["graphs"].items()} == {
        role: g["moe_dispatch"] for role, g in manifest(bundles[1])["engine"]["graphs"].items()
    }
    files = {g["file"] for s in stages for g in s["graphs"].values()}
    assert files == {f"stage{s}.{d}.onnx" for s in (0, 1) for d in ("capacity", "gather", "dense")}
    assert set(engine["tensorrt"]["profiles"]) == files
    plans = planned_files(engine["tensorrt"])  # what `compile` builds: one plan per stage graph file
    assert plans == {file: file.replace(".onnx", ".plan") for file in files}
    bound = topk_bound(m["profiles"], m["model"], engine["graphs"]["prefill"]["capacity_factor"])
    for stage in stages:
        own = abi.past_names(range(*stage["layers"]))
        for file in {g["file"] for g in stage["graphs"].values()}:
            proto = onnx.load(bundles[2] / file, load_external_data=False)
            assert {o.domain: o.version for o in proto.opset_import} == {"": 21}
            assert not {n.op_type for n in proto.graph.node} & {"Attention", "ScatterND", "MoE"}
            assert lint_tensorrt(ir.load(bundles[2] / file), topk_bound=bound) == [], file
            for profile in engine["tensorrt"]["profiles"][file]:
                assert list(profile["shapes"]) == [stage["inputs"][0], abi.POSITION_IDS, abi.PAST_LENGTHS, *own]
    # stage 1 takes hidden_states [batch, new, hidden]: up to max_batch 8 x prefill_tokens 1024 x hidden 256
    last = engine["tensorrt"]["profiles"]["stage1.capacity.onnx"][-1]["shapes"][abi.HIDDEN_IN]
    assert last == {"min": [1, 1, 256], "opt": [8, 1024, 256], "max": [8, 1024, 256]}
    assert engine["tensorrt"]["profiles"]["stage1.gather.onnx"][0]["shapes"][abi.HIDDEN_IN]["max"] == [8, 1, 256]
    # stage 0 holds only chunked layers (C = 16): its profiles select on ring slots, capped at the chunk
    assert [p["cache_slots"] for p in engine["tensorrt"]["profiles"]["stage0.gather.onnx"]] == [[16, 16]]


def test_two_stages_compute_what_one_stage_computes(engines):
    assert all(engine.backend == "onnxruntime" for engine in engines.values())  # no TensorRT here: the fallback
    assert [str(d) for d in engines[2].devices] == ["cpu", "cpu"]
    ids = [int(i) for i in np.random.default_rng(3).integers(0, engines[1].vocab_size, size=24)]
    for mode in ("prefill", "decode"):
        want, got = engines[1].score(ids, mode=mode), engines[2].score(ids, mode=mode)
        tolerance = REL_TOLERANCE * max(1.0, float(np.abs(want).max()))
        worst = float(np.abs(got - want).max())
        assert worst <= tolerance, f"{mode}: max |dlogit| {worst:.3e} > {tolerance:.3e}"
    assert engines[2].overflow_reruns > 0  # 24 tokens over 128 experts overflow the capacity graph: exact rerun
    prompts = [ids[:5], ids[:13]]
    assert (
        engines[2].generate(prompts, max_new_tokens=8).tokens == engines[1].generate(prompts, max_new_tokens=8).tokens
    )


def test_device_map_is_checked_at_load(bundles, engines):
    from llama4_deploy.runtime import BundleError, load

    with pytest.raises(ValueError, match=r"^cuda:0 was asked for, but this onnxruntime has no CUDAExecutionProvider"):
        load(bundles[2], verify_files=False, devices=["cuda:0", "cuda:1"])
    with pytest.raises(ValueError, match=r"devices lists 1 device\(s\) but bundle maverick-mini has 2"):
        load(bundles[2], verify_files=False, devices=["cpu"])
    with pytest.raises(BundleError, match="has no TensorRT plans yet"):
        load(bundles[2], verify_files=False, backend="tensorrt", devices=["cuda:0", "cuda:1"])
    with load(bundles[2], verify_files=False, devices=["cpu", "cpu"]) as engine:
        assert [str(d) for d in engine.devices] == ["cpu", "cpu"]


def test_cli_devices(bundles, engines):
    """`run --devices`: one sentence where onnxruntime has no CUDA (the fixture already said, once, that the
    bundle's TensorRT-form graphs run on ONNX Runtime here), and the engine's own tokens on the CPU."""
    bundle = bundles[2]
    user_error(
        invoke("run", bundle, "--ids", "1,2,3", "--max-new-tokens", "4", "--devices", "cuda:0,cuda:1"),
        "no CUDAExecutionProvider",
        "onnxruntime-gpu",
    )
    user_error(invoke("run", bundle, "--ids", "1,2,3", "--devices", "cpu"), "devices lists 1 device(s)")
    placed = invoke("run", bundle, "--ids", "1,2,3", "--max-new-tokens", "4", "--devices", "cpu,cpu")
    assert placed.exit_code == 0, placed.output
    assert placed.stdout.strip() == ",".join(map(str, engines[2].generate([[1, 2, 3]], max_new_tokens=4).tokens[0]))
