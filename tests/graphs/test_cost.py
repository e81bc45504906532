"""Cost model: counts from graphs agree with formulas, and each lowering meets its cost target on
scout-mini and maverick-mini shapes (decode <= 1.10x ideal FLOPs and weight bytes; prefill
<= 1.35x ideal FLOPs at capacity factor 1.25)."""

from __future__ import annotations

import pytest

from llama4_deploy import targets
from llama4_deploy.build.recipe import load_recipe
from llama4_deploy.build.steps.lower import link_model
from llama4_deploy.export.checkpoint import Checkpoint
from llama4_deploy.export.trace import trace_templates
from llama4_deploy.graphs import dispatch
from llama4_deploy.graphs.cost import step_cost
from llama4_deploy.graphs.lower_attention import LowerAttentionPass
from tests.conftest import write_checkpoint

DECODE = [{"batch": 1, "new": 1, "context": 256}, {"batch": 8, "new": 1, "context": 256}]
PREFILL = [{"batch": 1, "new": 256, "context": 16}, {"batch": 1, "new": 1024, "context": 16}]


@pytest.fixture(scope="module", params=["scout-mini", "maverick-mini"])
def lowered(request, tmp_path_factory):
    recipe = load_recipe(request.param)
    checkpoint = Checkpoint(write_checkpoint(tmp_path_factory.mktemp("ck") / request.param, recipe.random.config))
    templates = trace_templates(checkpoint.shape)
    cache = {}

    def lower(strategy):
        if strategy not in cache:
            model, _ = link_model(checkpoint, templates)
            dispatch.lowering(strategy)(model)
            LowerAttentionPass("decomposed")(model)  # TensorRT's form; onnx23 prices within 0.2% of it
            cache[strategy] = model
        return cache[strategy]

    return checkpoint.shape.to_dict(), recipe, lower


@pytest.mark.parametrize("dims", DECODE + PREFILL, ids=lambda d: f"b{d['batch']}t{d['new']}")
def test_dense_graph_matches_dense_formula(lowered, dims):
    facts, _, lower = lowered
    report = step_cost(lower("dense"), facts, dims)
    assert report.unresolved == 0
    # the graph also counts elementwise ops, which the formula leaves out: within 2%
    assert report.graph.flops == pytest.approx(report.dense.flops, rel=0.02)
    assert report.graph.weight_bytes == pytest.approx(report.dense.weight_bytes, rel=1e-6)


@pytest.mark.parametrize("strategy", ["gather", "native"])
@pytest.mark.parametrize("dims", DECODE, ids=["b1", "b8"])
def test_decode_targets(lowered, strategy, dims):
    facts, _, lower = lowered
    report = step_cost(lower(strategy), facts, dims)
    flops, weight_bytes = report.graph.ratio(report.ideal)
    assert report.unresolved == 0
    assert flops <= 1.10 and weight_bytes <= 1.10, (flops, weight_bytes)
    dense_flops, _ = report.dense.ratio(report.ideal)
    assert dense_flops > 2.5  # the dense formulation is far above: the test can tell them apart


@pytest.mark.parametrize("dims", PREFILL, ids=["t256", "t1024"])
def test_prefill_capacity_target(lowered, dims):
    facts, _, lower = lowered
    report = step_cost(lower("capacity"), facts, dims)
    flops, _ = report.graph.ratio(report.ideal)
    assert report.unresolved == 0
    assert flops <= 1.35, flops
    assert flops > 1.0  # capacity slack is really counted


def test_auto_choices(lowered):
    facts, recipe, lower = lowered
    profiles = recipe.profiles.model_dump()
    ort, trt = targets.get("onnxruntime").dispatch, targets.get("tensorrt").dispatch
    assert dispatch.choose("auto", ort, lower, facts, profiles) == {"prefill": "native", "decode": "native"}
    # TensorRT cannot run com.microsoft.MoE: per-token gathers for decode, capacity for prefill
    trt_roles = dispatch.choose("auto", trt, lower, facts, profiles)
    assert trt_roles["decode"] == "gather" and trt_roles["prefill"] in ("capacity", "dense")
    with pytest.raises(ValueError, match="not available for the tensorrt backend"):
        dispatch.choose("native", trt, lower, facts, profiles)
