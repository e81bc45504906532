"""`llama4-deploy plan`: counts against transformers and the published figures, bytes against a real
bundle, fits against Meta's deployment claims, the context and stage-split arithmetic against brute force."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from llama4_deploy.build.recipe import load_recipe
from llama4_deploy.planning.deployment import (
    GPUS,
    PlanConfig,
    balanced_split,
    count_parameters,
    deployment,
    fewest_gpus,
    load_shape,
    longest_context,
    precision_bytes,
    stage_costs,
)
from tests.conftest import quiet_build
from tests.test_cli import invoke, user_error

H100, H200 = GPUS


def test_parameter_counts_equal_transformers_and_the_published_figures():
    import torch
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    counts = {}
    for name in ("scout", "maverick"):
        config = dict(load_recipe(name).published_config)
        config.pop("model_type")
        with torch.device("meta"):  # no memory: shapes only
            reference = Llama4ForCausalLM(Llama4TextConfig(**config))
        counts[name] = count_parameters(load_shape(name)[0])
        assert counts[name].total == sum(p.numel() for p in reference.parameters())
    # Meta's model cards: Scout 109B and Maverick 400B for the multimodal checkpoints, whose vision encoder
    # adds ~0.9B to the text model counted here; both 17B active
    assert 107.5e9 <= counts["scout"].total <= 110e9
    assert 399e9 <= counts["maverick"].total <= 403e9
    for count in counts.values():
        assert 16.5e9 <= count.active <= 17.5e9


def test_precision_bytes_equal_the_built_bundles_initializers(tmp_path, tiny_bundle):
    import onnx_ir as ir

    from llama4_deploy.export.weights import all_weights

    shape = load_shape("tiny")[0]
    int4_qdq = dict(precision="int4", quant_form="qdq", block_size=32, moe_dispatch="gather")
    int4 = quiet_build("tiny", tmp_path / "int4", **int4_qdq)
    for bundle, graph, precision in ((tiny_bundle, "native.onnx", "fp32"), (int4, "gather.onnx", "int4")):
        stored = {n: v.const_value.nbytes for n, v in ir.load(bundle / graph).graph.initializers.items()}
        names = all_weights(shape)
        built = sum(size for n, size in stored.items() if any(n == w or n.startswith(w + ".") for w in names))
        planned = precision_bytes(shape, precision, PlanConfig(compute_dtype="float32", block_size=32))
        assert planned.total_bytes == built, precision


def test_meta_deployment_claims():
    scout, maverick = load_shape("scout")[0], load_shape("maverick")[0]
    config = PlanConfig()
    int4 = precision_bytes(scout, "int4")
    # Meta: Scout fits one H100 with INT4 weights (here at 32k tokens, batch 1, bf16 KV and workspace)
    assert deployment(scout, int4, H100, 1, config.context, 1, config.prefill_tokens).fits
    assert not deployment(scout, precision_bytes(scout, "bf16"), H100, 1, config.context, 1, config.prefill_tokens).fits
    # Maverick FP8 (~403 GB): one 8 x H100 host holds it; 6 is the fewest, 5 cannot (5 x 79.6 GiB = 398 GiB
    # against 375 GiB of weights, but no split of 48 unequal layers leaves every stage its KV and workspace)
    fp8 = precision_bytes(maverick, "fp8")
    assert deployment(maverick, fp8, H100, 8, config.context, 1, config.prefill_tokens).fits
    assert len(fewest_gpus(maverick, fp8, H100, config.context, 1, config.prefill_tokens).stages) == 6
    assert not deployment(maverick, fp8, H100, 5, config.context, 1, config.prefill_tokens).fits


@pytest.mark.parametrize(
    "name,precision,gpu,stages,batch",
    [
        ("scout", "int4", H100, 1, 1),
        ("scout", "int4", H100, 1, 8),
        ("maverick", "fp8", H200, 3, 1),
        ("maverick-mini", "fp32", H100, 1, 1),
    ],
)
def test_longest_context_is_the_edge_of_fitting(name, precision, gpu, stages, batch):
    shape = load_shape(name)[0]
    p = precision_bytes(shape, precision)
    split = [s.layers for s in deployment(shape, p, gpu, stages, 32768, 1, 2048).stages]
    tokens = longest_context(shape, p, gpu, split, batch, 2048)
    assert tokens > 0
    assert deployment(shape, p, gpu, stages, tokens, batch, 2048, split).fits
    if tokens < shape.max_position_embeddings:
        assert not deployment(shape, p, gpu, stages, tokens + 1, batch, 2048, split).fits
    else:  # the model's own limit (maverick-mini's 4096): the cache is small against a GPU
        assert name == "maverick-mini"


def test_balanced_split_is_optimal_and_contiguous():
    rng = random.Random(0)
    for _ in range(200):
        costs = [rng.randint(1, 100) for _ in range(rng.randint(1, 9))]
        stages = rng.randint(1, len(costs))
        split = balanced_split(costs, stages)
        assert len(split) == stages and all(len(r) for r in split)
        assert [i for r in split for i in r] == list(range(len(costs)))
        best = min(
            max(sum(costs[a:b]) for a, b in zip((0, *cuts), (*cuts, len(costs))))
            for cuts in itertools.combinations(range(1, len(costs)), stages - 1)
        )
        assert max(sum(costs[i] for i in r) for r in split) == best


def test_maverick_split_puts_embedding_first_and_head_last():
    shape = load_shape("maverick")[0]
    p = precision_bytes(shape, "fp8")
    costs = stage_costs(shape, p, 32768, 1, 2048)
    split = balanced_split(costs, 6)
    loads = [sum(costs[i] for i in r) for r in split]
    assert max(loads) <= 1.05 * sum(costs) / 6  # 24 MoE layers of ~16 GB: balanced to within one dense layer
    d = deployment(shape, p, H100, 6, 32768, 1, 2048)
    assert d.stages[0].weight_bytes == p.embed_bytes + sum(p.layer_bytes[i] for i in d.stages[0].layers)
    assert d.stages[-1].weight_bytes == p.head_bytes + sum(p.layer_bytes[i] for i in d.stages[-1].layers)


def test_plan_cli_on_recipes_and_on_a_checkpoint(checkpoint_dir):
    for name, total in (("scout", "107.77B"), ("maverick", "400.71B")):
        result = invoke("plan", name)
        assert result.exit_code == 0, result.output
        out = result.stdout
        assert f"total {total}, active per token 17.1" in out
        for needle in ("H100 80GB", "H200 141GB", "10M-token", "suggested stage split", "int4", "fp8"):
            assert needle in out, needle
    # a checkpoint written by a test (multimodal, sharded): its config only
    result = invoke("plan", checkpoint_dir, "--stages", "2", "--precision", "int4")
    assert result.exit_code == 0, result.output
    shape = load_shape(str(checkpoint_dir))[0]
    config = json.loads((checkpoint_dir / "config.json").read_text())["text_config"]
    assert shape.hidden_size == config["hidden_size"]
    assert f"total {count_parameters(shape).total / 1e9:.2f}B" in result.stdout
    assert "int4 on 2 x H100 80GB" in result.stdout


def test_plan_bad_input(tmp_path):
    user_error(invoke("plan", tmp_path / "missing"), "neither a recipe", "nor a checkpoint directory")
    user_error(invoke("plan", tmp_path), "has no config.json")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    user_error(invoke("plan", tmp_path), "model_type 'llama'")
    user_error(invoke("plan", "scout", "--stages", "49"), "--stages 49", "48 layers")
    assert list(tmp_path.iterdir()) == [tmp_path / "config.json"]  # plan writes nothing


def test_scout_recipe_refuses_a_checkpoint_of_another_shape(tmp_path, checkpoint_dir):
    from llama4_deploy.build import BuildError, build

    with pytest.raises(BuildError, match=r"^checkpoint has hidden_size=\d+, but recipe scout expects 5120; "):
        build("scout", checkpoint=checkpoint_dir, out=tmp_path / "out", log=lambda _: None)
    assert not (tmp_path / "out").exists()
