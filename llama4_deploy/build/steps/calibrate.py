"""Step `calibrate`: what quantization measures on real activations before any graph is written. Static FP8
activation ranges for specs that quantize activations (export/calibrate.py; kept in the build cache), AWQ's
per-channel scales for int4 awq (export/awq.py: folded into the weights as they stream); nothing for the rest.
Either writes its record file into the bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llama4_deploy.build.cache import step_key
from llama4_deploy.build.context import BuildContext, Calibration
from llama4_deploy.build.options import BuildError
from llama4_deploy.export import awq
from llama4_deploy.export.calibrate import CalibrationError, calibration_ids, collect_amax, write_ranges


def run(ctx: BuildContext) -> Calibration:
    loaded = ctx.require("loaded")
    spec, recipe = loaded.spec, loaded.recipe
    if any(rule.method == "awq" for rule in spec.rules):
        return _awq(ctx)
    if not spec.activations:
        if recipe.calibration is not None:
            raise BuildError(f"precision {spec.precision} quantizes no activations, so --calibration has no use")
        return Calibration()
    key = step_key("calibrate", loaded.inputs)
    hit = ctx.cache.get("calibrate", key)
    if hit is None:
        with ctx.cache.put("calibrate", key) as (directory, record):
            amax, calibration = _ranges(ctx, directory)
            record.update(amax=amax, calibration=calibration)
        hit = ctx.cache.entry("calibrate", key), record
    ctx.cache.link_files("calibrate", key, ctx.bundle)
    return Calibration(hit[1]["amax"], hit[1]["calibration"])


def _ids(ctx: BuildContext) -> list[list[int]]:
    loaded = ctx.require("loaded")
    recipe = loaded.recipe
    try:
        return calibration_ids(recipe.calibration, loaded.checkpoint, seed=recipe.random.seed if recipe.random else 0)
    except CalibrationError as err:
        raise BuildError(str(err)) from None


def _source(recipe) -> str:
    return recipe.calibration or "seeded random tokens"


def _ranges(ctx: BuildContext, directory: Path) -> tuple[dict[str, float], dict[str, Any]]:
    """Activation ranges measured on the calibration tokens, their record file written into `directory`."""
    loaded = ctx.require("loaded")
    ids = _ids(ctx)
    ctx.log(f"[calibrate] {len(ids)} sequences, {sum(map(len, ids))} tokens from {_source(loaded.recipe)}")
    try:
        amax = collect_amax(loaded.source_dir, ids)
    except CalibrationError as err:
        raise BuildError(str(err)) from None
    return amax, write_ranges(directory, amax, loaded.recipe.calibration, ids)


def _awq(ctx: BuildContext) -> Calibration:
    loaded = ctx.require("loaded")
    ids = _ids(ctx)
    ctx.log(f"[awq] scale search over {len(ids)} sequences, {sum(map(len, ids))} tokens from {_source(loaded.recipe)}")
    # searched with the int4 rule's numbers, for every group: a projection kept at 8 bits (--int8-weights) shares
    # its group's scales (attention's q, k, v read one input), which stay exact in float whatever it is rounded to
    int4 = next(rule for rule in loaded.spec.rules if rule.weight == "int4")
    scales = awq.run(loaded.source_dir, loaded.checkpoint, ids, int4, ctx.log)
    record = {
        **awq.write_scales(ctx.bundle, scales),
        "source": _source(loaded.recipe),
        "sequences": len(ids),
        "tokens": sum(map(len, ids)),
    }
    return Calibration(None, record, awq.transforms(loaded.shape, scales))
