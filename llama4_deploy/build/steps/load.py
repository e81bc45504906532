"""Step `load`: the checkpoint (or the recipe's seeded random weights, written once into the build cache), checked
against its config and the recipe; the context length, the pipeline-stage split and the quantization spec."""

from __future__ import annotations

import hashlib
import os
from typing import Any

from pydantic import ValidationError

from llama4_deploy.build.cache import checkpoint_identity, step_key
from llama4_deploy.build.clock import timed
from llama4_deploy.build.context import BuildContext, Loaded, VisionPlan
from llama4_deploy.build.options import BuildError
from llama4_deploy.build.recipe import Profiles, Recipe
from llama4_deploy.build.stages import Stage, model_split
from llama4_deploy.export.checkpoint import Checkpoint, CheckpointError
from llama4_deploy.export.compressed_tensors import CompressedTensorsError, checkpoint_quant_spec, stored_fp8
from llama4_deploy.export.reference import random_model, write_random_multimodal
from llama4_deploy.export.shape import ModelShape
from llama4_deploy.export.vision_shape import (
    VisionConfigError,
    VisionShape,
    check_vision_shapes,
    image_spec,
    image_token_ids,
    published_mismatches,
    tiles_limit,
)
from llama4_deploy.graphs.quantize import QuantConfig, QuantSpec, make_spec
from llama4_deploy.runtime.bundle import BundleError
from llama4_deploy.runtime.paths import PathError, regular_file, utf8
from llama4_deploy.runtime.tokenizer import Tokenizer
from llama4_deploy.targets.base import Target

# context of a build from a bare --checkpoint: the checkpoint's max_position_embeddings, capped here
# (Scout and Maverick declare 10M tokens; the cache is sized by the filled context, so a higher cap
# costs nothing until used, but TensorRT profiles and golden checks are planned at this length)
DEFAULT_MAX_CONTEXT = 32768
GIB = 1024**3
CACHE_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}  # the KV cache is kept in the compute dtype


def run(ctx: BuildContext) -> Loaded:
    recipe, log = ctx.recipe, ctx.log
    calibration = calibration_identity(recipe.calibration)  # a file it cannot read is refused before any work
    if ctx.checkpoint is None:  # the recipe gives the sizes: its limits are checked before any weights are made
        spec = quant_spec(recipe, ctx.target)
        check_limits(recipe, recipe.random.shape(), spec.compute_dtype, ctx.force)
        check_qmoe_experts(spec, recipe.random.shape())
        key = step_key("checkpoint", recipe.random.model_dump(mode="json"))
        identity: Any = {"random checkpoint": key}
        if ctx.cache.get("checkpoint", key) is None:
            log(f"[load] recipe {recipe.name}: seeded random weights (seed {recipe.random.seed})")
            with ctx.cache.put("checkpoint", key) as (directory, _):
                r = recipe.random
                if r.vision_config is not None:  # a multimodal checkpoint: weights, tokenizer, processor files
                    write_random_multimodal(r.model_dump(mode="json"), directory)
                else:
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
            checkpoint.check_tensors()
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
            raise BuildError(
                f"the checkpoint's max_position_embeddings of {shape.max_position_embeddings} leaves "
                f"no context to build for"
            ) from None
        recipe = recipe.model_copy(update={"profiles": profiles})
        log(
            f"[profiles] max context {context} tokens (the checkpoint's max_position_embeddings "
            f"{shape.max_position_embeddings}, capped at {DEFAULT_MAX_CONTEXT}; --max-context sets it)"
        )
    spec = quant_spec(recipe, ctx.target, checkpoint)
    check_limits(recipe, shape, spec.compute_dtype, ctx.force)
    check_qmoe_experts(spec, shape)
    log(f"[profiles] {recipe.profiles.model_dump()}")
    split = stage_split(shape, recipe.stages, log)
    if checkpoint.logical is not None:
        log(
            f"[precision] {checkpoint.path.name} is pre-quantized FP8 (compressed-tensors): its FP8 weights and "
            f"scales go in as stored; its dynamic per-token activation scales become static per-tensor ones "
            f"(calibration)"
        )
    log(f"[precision] {spec.summary()}")
    inputs = [recipe.model_dump(mode="json"), identity, calibration]
    vision = vision_plan(recipe, checkpoint, source_dir, split, log)
    return Loaded(checkpoint, source_dir, recipe, split, spec, stored_fp8(checkpoint, shape), inputs, vision)


def vision_plan(recipe: Recipe, checkpoint: Checkpoint, source_dir, split: list[Stage], log) -> VisionPlan | None:
    """The vision engine a multimodal checkpoint adds (None: a text-only checkpoint, or --no-vision), its config,
    weights' shapes, processor files and image tokens checked now, before anything is traced."""
    if not isinstance(checkpoint.config.get("vision_config"), dict):
        return None
    if not recipe.vision:
        log("[vision] --no-vision: the checkpoint's vision tower is not built; the bundle takes text only")
        return None
    try:
        shape = VisionShape.from_config(checkpoint.config)
        if recipe.expect_vision:
            wrong = published_mismatches(shape)
            if wrong:
                raise BuildError(
                    f"checkpoint has {wrong[0]}, but recipe {recipe.name} expects the published vision "
                    f"config; is it the right model? (--no-vision builds its text model only)"
                )
        check_vision_shapes(checkpoint, shape)
        image = image_spec(source_dir, shape)
        tokens = image_token_ids(checkpoint.tokenizer_file, checkpoint.config)
    except VisionConfigError as err:
        raise BuildError(f"{err} (--no-vision builds the text model only)") from None
    max_tiles = tiles_limit(recipe.images_per_step, image["max_patches"])
    log(
        f"[vision] {shape.num_layers} layers at hidden {shape.hidden_size}, tiles of {shape.image_size} "
        f"({shape.tokens_per_tile} tokens each), up to {max_tiles} tiles per step"
    )
    return VisionPlan(shape, image, tokens, max_tiles)


def calibration_identity(path: str | None) -> str | None:
    """What a calibration file contributes to the cache keys: the SHA-256 of its bytes (its size and mtime could
    stay the same through an edit), after checking it is a regular file of UTF-8 text (export/calibrate.py reads
    it after tracing: a file it would refuse is refused now)."""
    if path is None:
        return None
    try:
        data = regular_file(path, "calibration file").read_bytes()
        utf8(data, f"calibration file {path}")
    except PathError as err:
        raise BuildError(str(err)) from None
    return hashlib.sha256(data).hexdigest()


def check_expected(recipe: Recipe, shape: ModelShape) -> None:
    """The checkpoint's facts the recipe pins (the published config's), refused in one sentence on a mismatch."""
    facts = shape.to_dict()
    for key, want in recipe.expect_config.items():
        got = facts.get(key)
        if isinstance(got, tuple):
            got = list(got)
        if got != want:
            raise BuildError(
                f"checkpoint has {key}={got!r}, but recipe {recipe.name} expects {want!r}; is it the right model?"
            )


def check_limits(recipe: Recipe, shape: ModelShape, compute_dtype: str, force: bool) -> None:
    """The profiles within the model's limits: the context within max_position_embeddings, and the KV cache at
    max_batch rows of max_context tokens within this machine's memory (the bound; `force` builds past it, for a
    bundle that runs elsewhere), refused in one sentence before anything is traced."""
    profiles = recipe.profiles
    if profiles.max_context > shape.max_position_embeddings:
        raise BuildError(
            f"max context {profiles.max_context} exceeds the checkpoint's "
            f"max_position_embeddings of {shape.max_position_embeddings}"
        )
    needed = shape.kv_cache_bytes(profiles.max_batch, profiles.max_context, CACHE_ITEMSIZE[compute_dtype])
    memory = machine_memory()
    if needed > memory and not force:
        raise BuildError(
            f"max_batch {profiles.max_batch} x max_context {profiles.max_context} needs a KV cache of "
            f"{needed / GIB:,.2f} GiB ({compute_dtype}), more than this machine's {memory / GIB:,.1f} GiB "
            f"of memory; lower --max-batch or --max-context, or pass --force to build it anyway"
        )


def check_qmoe_experts(spec: QuantSpec, shape: ModelShape) -> None:
    """int8 or asymmetric experts only where QMoE takes them (QuantSpec.qmoe_refusal), refused in one sentence
    before anything is traced."""
    refusal = spec.qmoe_refusal(shape.hidden_size, shape.intermediate_size) if shape.moe_layers else None
    if refusal:
        raise BuildError(refusal)


def machine_memory() -> int:
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def stage_split(shape: ModelShape, stages: int, log) -> list[Stage]:
    """The layers of each pipeline stage (llama4_deploy/build/stages.py), balanced by weight bytes."""
    if stages > shape.num_layers:
        raise BuildError(
            f"--stages {stages} exceeds the model's {shape.num_layers} layers; each stage needs at least one layer"
        )
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
        return make_spec(
            QuantConfig(
                precision=recipe.precision,
                compute_dtype=recipe.compute_dtype,
                block_size=recipe.block_size,
                form=recipe.quant_form,
                method=recipe.quant_method,
                int4_compute=recipe.int4_compute,
                int4_zero_point=recipe.int4_zero_point,
                int8_weights=recipe.int8_weights,
            ),
            target.int4_form,
        )
    except (ValueError, CompressedTensorsError) as err:
        raise BuildError(str(err)) from None
