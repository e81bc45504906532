"""The dispatch step prices one layer per kind (stage_graphs.CostingLayers) instead of the whole linked
model: its figures must be the whole graph's exactly (FLOPs and bytes are whole numbers, so equal means equal),
for every MoE dispatch at every profile point, and the auto choice must not move.

Cases: scout-mini (MoE in every layer: two MoE kinds), maverick-mini fp32 and int4 (dense and MoE layers
interleaved; int4 prices MatMulNBits / QMoE graphs), and a 6-layer tiny with RoPE everywhere, whose three
MoE layers are all one kind, so the costing graph holds two of them and the overflow combiner's `Or` chain
(two Ors in the model, one in the costing graph) is priced by multiplicity."""

from __future__ import annotations

import pytest

from llama4_deploy import targets
from llama4_deploy.build.context import BuildContext, Calibration, Loaded
from llama4_deploy.build.options import resolve
from llama4_deploy.build.stage_graphs import costing_layers
from llama4_deploy.build.steps import load, lower
from llama4_deploy.export.checkpoint import Checkpoint
from llama4_deploy.export.trace import trace_templates
from llama4_deploy.graphs import dispatch
from llama4_deploy.graphs.cost import profile_points, step_cost
from tests.conftest import write_checkpoint

ONE_MOE_KIND = {"num_hidden_layers": 6, "no_rope_layers": [1] * 6}


_CHECKPOINTS: dict[str, Checkpoint] = {}


@pytest.fixture(
    scope="module",
    params=[
        ("scout-mini", None, {}),
        ("maverick-mini", None, {}),
        ("maverick-mini", "int4", {}),
        ("tiny", None, ONE_MOE_KIND),
    ],
    ids=["scout-mini", "maverick-mini", "maverick-mini-int4", "tiny-one-moe-kind"],
)
def graphs(request, tmp_path_factory):
    name, precision, change = request.param
    recipe = resolve(name, None, precision=precision)
    if name not in _CHECKPOINTS:  # int4 prices the fp32 checkpoint's weights
        config = {**recipe.random.config, **change}
        _CHECKPOINTS[name] = Checkpoint(write_checkpoint(tmp_path_factory.mktemp("ck") / name, config))
    ckpt = _CHECKPOINTS[name]
    # the lowering's inputs as the load, trace and calibrate steps give them
    target = targets.get(recipe.backend)
    ctx = BuildContext(
        recipe,
        target,
        None,
        False,
        bundle=tmp_path_factory.mktemp("bundle"),
        cache=None,
        log=lambda _: None,
        started=0.0,
    )
    spec = load.quant_spec(recipe, target, ckpt)
    ctx.loaded = Loaded(ckpt, ckpt.path, recipe, [lower.one_stage(ckpt.shape)], spec, {}, [])
    ctx.templates, ctx.calibration = trace_templates(ckpt.shape), Calibration()
    costing = costing_layers(ckpt.shape)
    whole, priced = {}, {}
    for strategy in target.dispatch.strategies:
        if strategy in target.dispatch_refusals(spec):
            continue
        whole[strategy] = lower.lower(ctx, lower.one_stage(ckpt.shape), strategy)[0]
        model = lower.lower(ctx, costing, strategy, checks=False)[0]
        priced[strategy] = dispatch.Priced(model, costing.multiplicity)
    return ckpt.shape, recipe, costing, whole, priced


def test_costing_graph_holds_one_layer_per_kind(graphs):
    shape, _, costing, whole, priced = graphs
    kinds = [shape.layer_kinds[layer] for layer in costing.layers]
    assert set(kinds) == set(shape.layer_kinds)
    assert sum(costing.stands_for.values()) == shape.num_layers
    for strategy, graph in priced.items():  # a fraction of the whole graph's nodes
        assert len(graph.model.graph) < len(whole[strategy].graph)
    if shape.num_layers == 6:  # one MoE kind: layers 1 and 3 stand for 1, 3 and 5
        assert costing.layers == (0, 1, 3) and costing.stands_for == {0: 3, 1: 2, 3: 1}


def test_priced_equals_whole_graph_at_every_point(graphs):
    shape, recipe, _, whole, priced = graphs
    facts, machine = shape.to_dict(), targets.get(recipe.backend).dispatch.machine
    for strategy in whole:
        for _, _, dims in profile_points(recipe.profiles.model_dump()):
            per_kind = step_cost(priced[strategy].model, facts, dims, priced[strategy].multiplicity)
            assert per_kind == step_cost(whole[strategy], facts, dims), (strategy, dims)
            assert per_kind.unresolved == 0
            assert dispatch.estimated_seconds(priced[strategy], facts, dims, machine) == dispatch.estimated_seconds(
                whole[strategy], facts, dims, machine
            ), (strategy, dims)


def test_auto_choice_unchanged(graphs):
    shape, recipe, _, whole, priced = graphs
    facts, profiles = shape.to_dict(), recipe.profiles.model_dump()
    excluded = tuple(s for s in dispatch.STRATEGIES if s not in whole)
    rules = targets.get(recipe.backend).dispatch
    chosen = dispatch.choose(
        "auto", rules, priced.__getitem__, facts, profiles, recipe.capacity_factor, excluded=excluded
    )
    assert chosen == dispatch.choose(
        "auto", rules, whole.__getitem__, facts, profiles, recipe.capacity_factor, excluded=excluded
    )
