"""Link and lower one graph: a pipeline stage's layers stamped with their weights (streamed from the checkpoint),
run in the compute dtype, its MoE and attention lowered for one dispatch, quantized, and checked (the static-shape
lint and the target's own). The dispatch step lowers each candidate this way to price it; the save step lowers each
stage's graphs and writes them."""

from __future__ import annotations

from typing import Any

import onnx_ir as ir
import torch

from llama4_deploy.build.clock import timed
from llama4_deploy.build.context import BuildContext
from llama4_deploy.build.options import BuildError
from llama4_deploy.build.stage_graphs import EmbeddingsStage, link_embed, link_stage
from llama4_deploy.build.stages import Stage
from llama4_deploy.export.checkpoint import Checkpoint
from llama4_deploy.export.weights import WeightSource
from llama4_deploy.graphs import dispatch
from llama4_deploy.graphs.compute_dtype import ComputeDtypePass
from llama4_deploy.graphs.lint import lint_static
from llama4_deploy.graphs.lower_attention import LowerAttentionPass
from llama4_deploy.graphs.lower_skip_norm import FuseSkipNormPass
from llama4_deploy.graphs.passes import run_passes
from llama4_deploy.graphs.quant_pass import quantize_passes
from llama4_deploy.graphs.streamed import Stored, StreamedTensor
from llama4_deploy.targets import TargetError


def checkpoint_weight(checkpoint: Checkpoint, source: WeightSource, name: str, rewrite=None) -> StreamedTensor:
    """A checkpoint tensor as the saver will write it: read when written, converted to fp32 and checked for NaN/Inf
    on the way (in memory, as it streams: no extra pass over the checkpoint), then `rewrite` (AWQ's scales) if any.
    Without a rewrite it keeps `stored`, so a re-layout (graphs/lower_moe_native.py) converts in its own copy."""
    dims = list(source.checkpoint_shape)
    if source.transpose:
        dims[-2], dims[-1] = dims[-1], dims[-2]

    def read():
        tensor = checkpoint.tensor(source.checkpoint_name)
        return tensor.transpose(-1, -2) if source.transpose else tensor

    def checked(tensor, tensor_name: str) -> ir.TensorProtocol:
        # a sum with a NaN or Inf in it is never finite: one cheap reduction clears almost every tensor, and
        # only a non-finite sum (a bad value, or an overflow of large ones) pays for the element-wise check
        finite = torch.isfinite(tensor) if not bool(torch.isfinite(tensor.sum())) else None
        if finite is not None and not bool(finite.all()):
            raise BuildError(
                f"checkpoint tensor {checkpoint.prefix}{source.checkpoint_name} holds "
                f"{int((~finite).sum())} NaN or Inf values; the build refuses non-finite weights"
            )
        return ir.tensor(tensor.contiguous().numpy(), name=tensor_name)

    def compute() -> ir.TensorProtocol:
        tensor = checked(read().to(torch.float32), name)
        return tensor if rewrite is None else ir.tensor(rewrite(tensor.numpy()), name=name)

    return StreamedTensor(
        compute, ir.DataType.FLOAT, dims, name, stored=Stored(read, checked) if rewrite is None else None
    )


def link_model(checkpoint: Checkpoint, templates: dict[str, Any], rewrites=None) -> tuple[ir.Model, int]:
    """The unsplit model linked: embed, prologue, every layer, head (llama4_deploy/build/stage_graphs.py), and the
    number of stamps. `rewrites`: weight name -> a function applied to that weight as it streams (AWQ's scales)."""
    return link_stage(
        checkpoint,
        templates,
        one_stage(checkpoint.shape),
        lambda source, name: checkpoint_weight(checkpoint, source, name, (rewrites or {}).get(name)),
    )


def one_stage(shape) -> Stage:
    return Stage(0, 0, shape.num_layers, 1)


def stage_graph(
    ctx: BuildContext, stage: Stage, strategy: str, passes: dict[str, int], layout: str = "matmul"
) -> ir.Model:
    """`lower`'s graph, kept in the context until saved (`forget`), its pass counts added to `passes` once."""
    key = (stage.count, stage.index, strategy, layout)
    if key not in ctx.lowered:
        ctx.lowered[key], counts = lower(ctx, stage, strategy, layout=layout)
        passes.update(counts)
    return ctx.lowered[key]


def forget(ctx: BuildContext, stage: Stage, strategy: str, layout: str = "matmul") -> None:
    ctx.lowered.pop((stage.count, stage.index, strategy, layout), None)


def lower(
    ctx: BuildContext, stage, strategy: str, layout: str = "matmul", checks: bool = True
) -> tuple[ir.Model, dict[str, int]]:
    """One stage's graph for one MoE dispatch (`stage`: a Stage, or the dispatch step's CostingLayers) and its pass
    counts. `layout` "native": a gather reading the native graph's expert weights (a bundle with both stores them
    once, graphs/lower_moe_gather.py). Without `checks` (a graph that is only priced): no lint."""
    loaded, target = ctx.require("loaded"), ctx.target
    recipe, spec, checkpoint = loaded.recipe, loaded.spec, loaded.checkpoint
    calibration = ctx.require("calibration")
    rewrites = calibration.rewrites or {}
    attention = target.attention_form(recipe.attention)
    counts: dict[str, int] = {}
    with timed("link"):
        model, counts["link"] = link_stage(
            checkpoint,
            ctx.require("templates"),
            stage,
            lambda source, name: checkpoint_weight(checkpoint, source, name, rewrites.get(name)),
        )
    # quantized experts are 4-8x smaller than the fp32 ones the native part split is sized for: keep them whole,
    # so each expert's weights are quantized exactly as the checkpoint lays them out
    moe = dispatch.lowering(
        strategy,
        recipe.capacity_factor,
        target.dispatch.capacity_combine,
        split=1 if spec.quantized else None,
        layout=layout,
    )
    narrow = [ComputeDtypePass(spec.compute_dtype)] if spec.compute_dtype != "float32" else []
    try:
        with timed("lower"):
            # the gqa form is ONNX Runtime's kernels' form: its residual adds and norms fused too
            fused = [FuseSkipNormPass()] if attention == "gqa" else []
            counts.update(run_passes(model, [*narrow, moe, LowerAttentionPass(attention), *fused]))
        if spec.quantized:
            with timed("quantize"):  # the graph rewrite; the numbers are computed as `save` streams
                counts.update(
                    run_passes(
                        model,
                        quantize_passes(
                            spec, calibration.amax, per_expert=target.per_expert_weights, stored=loaded.stored_fp8
                        ),
                    )
                )
    except ValueError as err:  # LoweringError included: one sentence naming the node or weight
        raise BuildError(str(err)) from None
    counts[moe.name] = counts.pop(moe.name)  # last in the pass table, where the manifest has always listed it
    if not checks:
        return model, counts
    with timed("lint"):
        problems = lint_static(model)
    if problems:
        raise BuildError(f"the {strategy} graph breaks the static-shape rule: {problems[0]}")
    with timed("lint"):
        try:
            target.check_graph(
                model, strategy, recipe.profiles.model_dump(), loaded.shape.to_dict(), recipe.capacity_factor
            )
        except TargetError as err:
            raise BuildError(str(err)) from None
    return model, counts


def embed_graph(ctx: BuildContext) -> ir.Model:
    """The embedding step's graph (input_ids -> hidden_states), in the compute dtype, linted (static shapes and the
    target's checks)."""
    loaded = ctx.require("loaded")
    checkpoint, spec = loaded.checkpoint, loaded.spec
    model, _ = link_embed(
        checkpoint, ctx.require("templates"), lambda source, name: checkpoint_weight(checkpoint, source, name)
    )
    if spec.compute_dtype != "float32":
        run_passes(model, [ComputeDtypePass(spec.compute_dtype)])
    problems = lint_static(model)
    if problems:
        raise BuildError(f"the embed graph breaks the static-shape rule: {problems[0]}")
    recipe = loaded.recipe
    try:  # the target's own checks too (for tensorrt its parser lint), as for the stage graphs
        ctx.target.check_graph(
            model, "embed", recipe.profiles.model_dump(), loaded.shape.to_dict(), recipe.capacity_factor
        )
    except TargetError as err:
        raise BuildError(str(err)) from None
    return model


def embeddings_graph(ctx: BuildContext, stage: Stage, strategy: str, layout: str = "matmul") -> ir.Model:
    """The first stage taking hidden_states (stage_graphs.EmbeddingsStage; one stage: the whole model), lowered like
    its prefill graph; with several stages it hands hidden_states on to stage 1's graphs, as stage 0's do."""
    model, _ = lower(ctx, EmbeddingsStage(stage.index, stage.start, stage.stop, stage.count), strategy, layout=layout)
    return model
