"""Step `save`, once per pipeline stage: the stage's graphs, one per MoE dispatch in use, linked and lowered
(steps/lower.py) and written with their shared weights file, which is hashed as it is written
(llama4_deploy/build/stage_graphs.py). Each stage is kept in the build cache on its own."""

from __future__ import annotations

from llama4_deploy.build.cache import step_key
from llama4_deploy.build.clock import timed
from llama4_deploy.build.context import BuildContext, SavedStage
from llama4_deploy.build.stage_graphs import (
    EMBED_GRAPH,
    data_file,
    embeddings_graph_name,
    graph_file,
    save_stage_graphs,
)
from llama4_deploy.build.stages import Stage
from llama4_deploy.build.steps import lower
from llama4_deploy.runtime import abi
from llama4_deploy.runtime.integrity import hash_files


def run(ctx: BuildContext, stage: Stage) -> SavedStage:
    loaded, chosen = ctx.require("loaded"), ctx.require("dispatch")
    vision = loaded.vision is not None
    key = step_key("stage", loaded.inputs, [stage.index, stage.start, stage.stop, stage.count], chosen.roles, vision)
    step = f"stage{stage.index}"
    hit = ctx.cache.get(step, key)
    if hit is None:
        passes = dict(chosen.passes) if stage.count == 1 else {}
        models = {
            strategy: lower.stage_graph(ctx, stage, strategy, passes, chosen.layout(strategy))
            for strategy in chosen.strategies
        }
        embeddings = {}
        if vision and stage.first:  # the embedding step and the first stage's prefill taking its hidden_states
            prefill = chosen.roles["prefill"]
            models[EMBED_GRAPH] = lower.embed_graph(ctx)
            models[embeddings_graph_name(prefill)] = lower.embeddings_graph(ctx, stage, prefill, chosen.layout(prefill))
            embeddings = {
                "embed": graph_file(stage, EMBED_GRAPH),
                "prefill": graph_file(stage, embeddings_graph_name(prefill)),
            }
            exact = chosen.roles.get("exact")
            if exact is not None and exact != prefill:  # a capacity overflow reruns the step exactly, as for text
                models[embeddings_graph_name(exact)] = lower.embeddings_graph(ctx, stage, exact, chosen.layout(exact))
                embeddings["exact"] = graph_file(stage, embeddings_graph_name(exact))
        if stage.count > 1:
            ctx.log(f"[stage {stage.index}] layers {stage.start}-{stage.stop - 1}: {len(models)} graphs")
        with ctx.cache.put(step, key) as (directory, record):
            with timed("save"):
                layout, data_record = save_stage_graphs(models, directory, stage)
            overflow = {
                s for s, model in models.items() if any(o.name == abi.MOE_OVERFLOW for o in model.graph.outputs)
            }
            stage_inputs, stage_outputs = abi.stage_io(stage.layers, stage.first, stage.last, overflow=bool(overflow))
            record["stage"] = {
                "index": stage.index,
                "layers": [stage.start, stage.stop],
                "graphs": {
                    role: {"file": graph_file(stage, s), "reports_overflow": s in overflow}
                    for role, s in chosen.roles.items()
                },
                "external_data": data_file(stage),
                "weights_layout": layout,  # every graph of the stage carries it in its metadata_props
                "inputs": stage_inputs,
                "outputs": stage_outputs,
            }
            if embeddings:
                record["stage"]["embeddings"] = embeddings
            record["passes"] = passes
            files = {**hash_files(directory, [graph_file(stage, s) for s in models]), data_file(stage): data_record}
            record["files"] = dict(sorted(files.items()))
        for strategy in chosen.strategies:
            lower.forget(ctx, stage, strategy, chosen.layout(strategy))  # saved: free
    else:
        record = hit[1]
    ctx.cache.link_files(step, key, ctx.bundle)
    return SavedStage(record["stage"], key, record["files"], record["passes"])
