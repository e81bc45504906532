"""Step `dispatch`: which MoE lowering each engine role gets (graphs/dispatch.py). `auto` prices every candidate the
target can run with the cost model, on a graph of one layer per kind that costs the same as the whole model; the
whole model is lowered with each candidate too, for the pass counts (a one-stage build saves the chosen ones without
lowering them again). Kept in the build cache."""

from __future__ import annotations

from llama4_deploy.build.cache import step_key
from llama4_deploy.build.clock import timed
from llama4_deploy.build.context import BuildContext, Dispatch
from llama4_deploy.build.options import BuildError
from llama4_deploy.build.stage_graphs import costing_layers
from llama4_deploy.build.steps import lower
from llama4_deploy.graphs import dispatch


def run(ctx: BuildContext) -> Dispatch:
    loaded, target = ctx.require("loaded"), ctx.target
    recipe, shape = loaded.recipe, loaded.shape
    key = step_key("plan", loaded.inputs)
    hit = ctx.cache.get("plan", key)
    if hit is not None:
        roles, passes = hit[1]["roles"], hit[1]["passes"]
    else:
        passes: dict[str, int] = {}
        full, costing, priced_graphs = lower.one_stage(shape), costing_layers(shape), {}

        def priced(strategy: str):
            """A candidate as the cost model prices it: one layer per kind, each counted as often as the model has it
            (stage_graphs.CostingLayers), which costs the same as the whole graph for a fraction of the shape
            inference. The whole graph is lowered too: its pass counts are the build's, and a chosen one is saved."""
            if strategy not in priced_graphs:
                lower.stage_graph(ctx, full, strategy, passes)
                model, _ = lower.lower(ctx, costing, strategy, checks=False)
                priced_graphs[strategy] = dispatch.Priced(model, costing.multiplicity)
            return priced_graphs[strategy]

        try:
            # fp8 activation scales cannot reach inside the fused MoE kernel (graphs/lower_quant_qdq.py)
            refusals = target.dispatch_refusals(loaded.spec)
            for wanted in (recipe.moe_dispatch, *recipe.extra_dispatches):
                if wanted in refusals:
                    raise BuildError(refusals[wanted])
            # priced on the unsplit model: every stage gets the same dispatch per role
            with timed("dispatch"):  # costs every candidate lowering (its link and lower count as theirs)
                roles = dispatch.choose(
                    recipe.moe_dispatch,
                    target.dispatch,
                    priced,
                    shape.to_dict(),
                    recipe.profiles.model_dump(),
                    recipe.capacity_factor,
                    excluded=tuple(refusals),
                )
        except BuildError:
            raise
        except ValueError as err:
            raise BuildError(str(err)) from None
        roles = target.roles(recipe.moe_dispatch, roles)
        with ctx.cache.put("plan", key) as (_, record):
            record.update(roles=roles, passes=passes)
    ctx.log(f"[dispatch] {recipe.moe_dispatch}: {roles}")
    for strategy in recipe.extra_dispatches:  # saved beside the roles' graphs, under a role named after it
        roles.setdefault(strategy, strategy)
    strategies = list(dict.fromkeys(roles.values()))
    # beside a native graph, the gather reads the native layout: one copy of the experts, not two
    layouts = {"gather": "native"} if "native" in strategies else {}
    result = Dispatch(roles, passes, layouts)
    kept = {(1, 0, s, result.layout(s)) for s in strategies} if loaded.split[0].count == 1 else set()
    for graph in set(ctx.lowered) - kept:
        del ctx.lowered[graph]  # graphs that only priced the candidates
    return result
