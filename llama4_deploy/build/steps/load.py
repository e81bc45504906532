"""Step `load`: the checkpoint (or the recipe's seeded random weights, written once into the build cache), checked
against its config and the recipe; the context length, the pipeline-stage split and the quantization spec."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from llama4_deploy.build.cache import checkpoint_identity, step_key
from llama4_deploy.build.clock import timed
from llama4_deploy.build.context import BuildContext, Loaded
from llama4_deploy.build.options import BuildError
from llama4_deploy.build.recipe import Profiles, Recipe
from llama4_deploy.build.stages import Stage, model_split
from llama4_deploy.export.checkpoint import Checkpoint, CheckpointError
from llama4_deploy.export.compressed_tensors import CompressedTensorsError, checkpoint_quant_spec, stored_fp8
from llama4_deploy.export.reference import random_model
from llama4_deploy.export.shape import ModelShape
from llama4_deploy.export.weights import all_weights
from llama4_deploy.graphs.quantize import QuantConfig, QuantSpec, make_spec
from llama4_deploy.runtime.bundle import BundleError
from llama4_deploy.runtime.tokenizer import Tokenizer
from llama4_deploy.targets.base import Target

# context of a build from a bare --checkpoint: the checkpoint's max_position_embeddings, capped here
# (Scout and Maverick declare 10M tokens; the cache is sized by the filled context, so a higher cap
# costs nothing until used, but TensorRT profiles and golden checks are planned at this length)
DEFAULT_MAX_CONTEXT = 32768


def run(ctx: BuildContext) -> Loaded:
    recipe, log = ctx.recipe, ctx.log
    if ctx.checkpoint is None:
        key = step_key("checkpoint", recipe.random.model_dump(mode="json"))
        identity: Any = {"random checkpoint": key}
        if ctx.cache.get("checkpoint", key) is None:
            log(f"[load] recipe {recipe.name}: seeded random weights (seed {recipe.random.seed})")
            with ctx.cache.put("checkpoint", key) as (directory, _):
                r = recipe.random
                random_model(r.config, r.seed, r.logit_gain, r.router_gain).save_pretrained(directory)
        source_dir = ctx.cache.entry("checkpoint", key)
    else:
        source_dir = ctx.checkpoint
        log(f"[load] checkpoint {source_dir}")
        identity = checkpoint_identity(source_dir) if source_dir.is_dir() else None
    try:
        with timed("load"):
            checkpoint = Checkpoint(source_dir)
            check_expected(recipe, checkpoint.shape)
            check_weights(checkpoint)
        if checkpoint.tokenizer_file is not None:  # copied into the bundle: refuse a damaged one now, not at run time
            Tokenizer(checkpoint.tokenizer_file)
    except (CheckpointError, BundleError) as err:
        raise BuildError(str(err)) from None
    shape = checkpoint.shape
    if ctx.context_from_checkpoint:
        context = min(shape.max_position_embeddings, DEFAULT_MAX_CONTEXT)
        try:
            profiles = Profiles.model_validate({**recipe.profiles.model_dump(), "max_context": context})
        except ValidationError:
            raise BuildError(f"the checkpoint's max_position_embeddings of {shape.max_position_embeddings} leaves "
                             f"no context to build for") from None
        recipe = recipe.model_copy(update={"profiles": profiles})
        log(f"[profiles] max context {context} tokens (the checkpoint's max_position_embeddings "
            f"{shape.max_position_embeddings}, capped at {DEFAULT_MAX_CONTEXT}; --max-context sets it)")
    if recipe.profiles.max_context > shape.max_position_embeddings:
        raise BuildError(f"max context {recipe.profiles.max_context} exceeds the checkpoint's "
                         f"max_position_embeddings of {shape.max_position_embeddings}")
    log(f"[profiles] {recipe.profiles.model_dump()}")
    split = stage_split(shape, recipe.stages, log)
    spec = quant_spec(recipe, ctx.target, checkpoint)
    if checkpoint.logical is not None:
        log(f"[precision] {checkpoint.path.name} is pre-quantized FP8 (compressed-tensors): its FP8 weights and "
            f"scales go in as stored; its dynamic per-token activation scales become static per-tensor ones "
            f"(calibration)")
    log(f"[precision] {spec.summary()}")
    calibration_file = Path(recipe.calibration) if recipe.calibration else None
    calibration_identity = ([calibration_file.stat().st_size, calibration_file.stat().st_mtime_ns]
                            if calibration_file is not None and calibration_file.is_file() else None)
    inputs = [recipe.model_dump(mode="json"), identity, calibration_identity]
    return Loaded(checkpoint, source_dir, recipe, split, spec, stored_fp8(checkpoint, shape), inputs)


def check_expected(recipe: Recipe, shape: ModelShape) -> None:
    """The checkpoint's facts the recipe pins (the published config's), refused in one sentence on a mismatch."""
    facts = shape.to_dict()
    for key, want in recipe.expect_config.items():
        got = facts.get(key)
        if isinstance(got, tuple):
            got = list(got)
        if got != want:
            raise BuildError(f"checkpoint has {key}={got!r}, but recipe {recipe.name} expects {want!r}; "
                             f"is it the right model?")


def check_weights(checkpoint: Checkpoint) -> None:
    """Every tensor config.json implies is in the checkpoint, with the shape it implies."""
    for source in all_weights(checkpoint.shape).values():
        if not checkpoint.has(source.checkpoint_name):
            raise BuildError(f"tensor {checkpoint.prefix}{source.checkpoint_name} is missing from the checkpoint")
        got = checkpoint.tensor_shape(source.checkpoint_name)
        if got != source.checkpoint_shape:
            raise BuildError(
                f"tensor {checkpoint.prefix}{source.checkpoint_name} has shape {list(got)}, "
                f"config.json implies {list(source.checkpoint_shape)}"
            )


def stage_split(shape: ModelShape, stages: int, log) -> list[Stage]:
    """The layers of each pipeline stage (llama4_deploy/build/stages.py), balanced by weight bytes."""
    if stages > shape.num_layers:
        raise BuildError(f"--stages {stages} exceeds the model's {shape.num_layers} layers; each stage needs at "
                         f"least one layer")
    split = model_split(shape, stages)
    if stages > 1:
        log(f"[stages] {stages} stages: " + ", ".join(f"layers {s.start}-{s.stop - 1}" for s in split))
    return split


def quant_spec(recipe: Recipe, target: Target, checkpoint: Checkpoint | None = None) -> QuantSpec:
    """The build's quantization spec: a pre-quantized checkpoint's own, or the recipe's precision preset on the
    target (which decides what the auto form means)."""
    try:
        if checkpoint is not None and checkpoint.logical is not None:
            return checkpoint_quant_spec(checkpoint, recipe.precision, recipe.compute_dtype, recipe.quant_form)
        return make_spec(QuantConfig(precision=recipe.precision, compute_dtype=recipe.compute_dtype,
                                     block_size=recipe.block_size, form=recipe.quant_form,
                                     method=recipe.quant_method, int4_compute=recipe.int4_compute), target.int4_form)
    except (ValueError, CompressedTensorsError) as err:
        raise BuildError(str(err)) from None
