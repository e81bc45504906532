"""The build's TensorRT target (`build --target tensorrt`, recipe key `backend: tensorrt`).

A TensorRT-form bundle holds only what TensorRT's ONNX parser documents, so it can be written and
verified on any machine and compiled to plans on the GPU machine (`llama4-deploy compile`):

    attention      decomposed (TensorRT's Attention takes no past key/value)
    MoE dispatch   auto: gather for decode, capacity for prefill (combine without a ScatterND
                   reduction), and an exact graph (gather or dense, never native) for overflow reruns
    quantization   qdq only; stacked expert weights as per-expert 2-D constants (lower_quant_qdq.py);
                   INT4 blocks of 64 or 128
    compute dtype  bfloat16 unless --precision / --compute-dtype say otherwise (fp16, fp32)
    every graph    passes graphs/lint_tensorrt.py (TensorRT 10.15's operator table and Q/DQ rules)
    manifest       engine.tensorrt: the pinned TensorRT version and each graph file's optimization
                   profiles (llama4_deploy/targets/tensorrt_profiles.py), every pipeline stage's graph files included
    stages         --stages N: each stage graph in this form, linted on its own; `compile` builds one plan
                   per stage graph file and the tensorrt backend runs stage s on its device
"""

from __future__ import annotations

import math
from typing import Any

from llama4_deploy.build.recipe import Recipe

TARGETS = ("onnxruntime", "tensorrt")
# a recipe's fp32 precision under --target tensorrt, by the --compute-dtype given (None: none given)
_PRECISION_FOR_COMPUTE = {None: "bf16", "bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


class TargetError(ValueError):
    """A recipe or flag the TensorRT target cannot take; one sentence."""


def configure(recipe: Recipe, precision: str | None, compute_dtype: str | None) -> Recipe:
    """The recipe with TensorRT's forms fixed. `precision` / `compute_dtype`: what the user passed
    (None: not passed), which decide the default compute dtype (bfloat16)."""
    if recipe.quant_form == "ort":
        raise TargetError("the ort quantization form uses ONNX Runtime's contrib kernels, which TensorRT cannot run; "
                          "use --quant-form qdq (or auto) with --target tensorrt")
    if recipe.attention == "onnx23":
        raise TargetError("TensorRT's Attention op takes no past key/value inputs, so --attention onnx23 cannot "
                          "target it; use --attention decomposed (or auto)")
    if recipe.moe_dispatch == "native":
        raise TargetError("the native MoE dispatch is ONNX Runtime's com.microsoft.MoE, which TensorRT cannot run; "
                          "use --moe-dispatch gather, capacity, dense or auto")
    update: dict[str, Any] = {"backend": "tensorrt", "quant_form": "qdq", "attention": "decomposed"}
    chosen = precision or recipe.precision
    if precision is None and recipe.precision == "fp32":
        chosen = _PRECISION_FOR_COMPUTE[compute_dtype]
        update["precision"] = chosen
    if chosen in ("fp8", "int4") and compute_dtype is None and recipe.compute_dtype is None:
        update["compute_dtype"] = "bfloat16"
    if chosen == "int4" and recipe.block_size not in (64, 128):
        raise TargetError(f"int4 block {recipe.block_size} is not a block TensorRT documents for INT4 "
                          f"DequantizeLinear (64 or 128); use --block-size 64 or 128 with --target tensorrt")
    return Recipe.model_validate({**recipe.model_dump(), **update})


def roles(requested: str, planned: dict[str, str]) -> dict[str, str]:
    """The engine roles of a TensorRT bundle: `auto` is gather for decode and capacity for prefill,
    with the planner's exact graph for reruns; a pinned dispatch is the planner's own answer."""
    if requested != "auto":
        return planned
    exact = planned.get("exact") or ("gather" if planned.get("prefill") == "gather" else planned["prefill"])
    return {"prefill": "capacity", "decode": "gather", "exact": exact if exact in ("gather", "dense") else "gather"}


def topk_bound(profiles: dict[str, int], model: dict[str, Any], capacity_factor: float) -> int:
    """The largest TopK K of any graph under the profiles: the capacity dispatch's slots per expert at
    max_batch x prefill_tokens tokens, or top_k (the router's)."""
    tokens = profiles["max_batch"] * profiles["prefill_tokens"]
    capacity = min(tokens, math.ceil(capacity_factor * tokens * model["top_k"] / model["num_experts"]))
    return max(capacity, model["top_k"])


def check_graph(model, strategy: str, profiles: dict[str, int], facts: dict[str, Any],
                capacity_factor: float) -> None:
    """Raise TargetError (one sentence, the first problem) if TensorRT's parser would refuse the graph."""
    from llama4_deploy.graphs.lint_tensorrt import TENSORRT_VERSION, lint_tensorrt

    problems = lint_tensorrt(model, topk_bound=topk_bound(profiles, facts, capacity_factor))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise TargetError(f"the {strategy} graph is not one TensorRT {TENSORRT_VERSION} can parse: "
                          f"{problems[0]}{more}")


def manifest_record(stages: list[dict[str, Any]], profiles: dict[str, int], model: dict[str, Any],
                    layers: list[dict[str, Any]]) -> dict[str, Any]:
    """engine.tensorrt: what `compile` builds plans for, one plan per graph file of every pipeline stage
    (`stages`: the build's stage records; plans: filled in by compile)."""
    from llama4_deploy.graphs.lint_tensorrt import TENSORRT_VERSION
    from llama4_deploy.targets.tensorrt_profiles import stage_profiles

    return {
        "linted_for": TENSORRT_VERSION,
        "profiles": stage_profiles(stages, profiles, model, layers),
        "plans": None,
    }
