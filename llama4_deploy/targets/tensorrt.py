"""The TensorRT target (`build --target tensorrt`, recipe key `backend: tensorrt`).

A TensorRT-form bundle holds only what TensorRT's ONNX parser documents, so it can be written and
verified on any machine and compiled to plans on the GPU machine (`llama4-deploy compile`):

    attention      decomposed (TensorRT's Attention takes no past key/value)
    MoE dispatch   auto: gather for decode, capacity for prefill (combine without a ScatterND
                   reduction), and an exact graph (gather or dense, never native) for overflow reruns
    quantization   qdq only; stacked expert weights as per-expert 2-D constants (lower_quant_qdq.py);
                   INT4 blocks of 64 or 128 (default 128), activations in the compute dtype
    compute dtype  bfloat16 unless --precision / --compute-dtype say otherwise (fp16, fp32)
    every graph    passes graphs/lint_tensorrt.py (TensorRT 10.15's operator table and Q/DQ rules)
    manifest       engine.tensorrt: the pinned TensorRT version and each graph file's optimization
                   profiles (llama4_deploy/targets/tensorrt_profiles.py), every pipeline stage's graph files included,
                   and a vision bundle's vision graph (tiles 1 ... max_tiles), embedding step and embeddings prefill
    stages         --stages N: each stage graph in this form, linted on its own; `compile` builds one plan
                   per stage graph file and the tensorrt backend runs stage s on its device
"""

from __future__ import annotations

import math

import onnx_ir as ir

from llama4_deploy.graphs.dispatch import DispatchRules, Machine
from llama4_deploy.graphs.lint_tensorrt import TENSORRT_VERSION, lint_tensorrt
from llama4_deploy.targets import TargetError
from llama4_deploy.targets.base import Json, Target
from llama4_deploy.targets.tensorrt_profiles import stage_profiles, vision_profiles

# a recipe's fp32 precision under --target tensorrt, by the --compute-dtype given (None: none given)
_PRECISION_FOR_COMPUTE = {None: "bf16", "bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


class TensorRTTarget(Target):
    name = "tensorrt"
    # priced at an H200's balance; TensorRT's ScatterND takes no reduction, so capacity slots combine by Gather
    dispatch = DispatchRules(name, ("dense", "gather", "capacity"), Machine(790e12, 4.8e12), capacity_combine="gather")
    attention_auto = "decomposed"
    int4_form = "qdq"
    per_expert_weights = True
    parser = f"TensorRT {TENSORRT_VERSION}"

    def configure(self, recipe: Json, precision: str | None, compute_dtype: str | None) -> Json:
        """TensorRT's forms fixed; `precision` / `compute_dtype`: what the user passed (None: not passed), which
        decide the default compute dtype (bfloat16)."""
        if recipe["quant_form"] == "ort":
            raise TargetError(
                "the ort quantization form uses ONNX Runtime's contrib kernels, which TensorRT cannot "
                "run; use --quant-form qdq (or auto) with --target tensorrt"
            )
        if recipe["attention"] == "onnx23":
            raise TargetError(
                "TensorRT's Attention op takes no past key/value inputs, so --attention onnx23 cannot "
                "target it; use --attention decomposed (or auto)"
            )
        if recipe["attention"] == "gqa":
            raise TargetError(
                "the gqa attention form is ONNX Runtime's com.microsoft.GroupQueryAttention, which TensorRT "
                "cannot run; use --attention decomposed (or auto)"
            )
        if recipe["moe_dispatch"] == "native":
            raise TargetError(
                "the native MoE dispatch is ONNX Runtime's com.microsoft.MoE, which TensorRT cannot "
                "run; use --moe-dispatch gather, capacity, dense or auto"
            )
        update: Json = {"quant_form": "qdq", "attention": "decomposed"}
        chosen = precision or recipe["precision"]
        if precision is None and recipe["precision"] == "fp32":
            chosen = _PRECISION_FOR_COMPUTE[compute_dtype]
            update["precision"] = chosen
        if chosen in ("fp8", "int4") and compute_dtype is None and recipe["compute_dtype"] is None:
            update["compute_dtype"] = "bfloat16"
        if chosen == "int4" and recipe["block_size"] not in (None, 64, 128):  # None: the qdq form's 128
            raise TargetError(
                f"int4 block {recipe['block_size']} is not a block TensorRT documents for INT4 "
                f"DequantizeLinear (64 or 128); use --block-size 64 or 128 with --target tensorrt"
            )
        return update

    def roles(self, requested: str, chosen: dict[str, str]) -> dict[str, str]:
        """`auto` is gather for decode and capacity for prefill, with the chosen exact graph for reruns; a pinned
        dispatch is the cost model's own answer."""
        if requested != "auto":
            return chosen
        exact = chosen.get("exact") or ("gather" if chosen.get("prefill") == "gather" else chosen["prefill"])
        return {"prefill": "capacity", "decode": "gather", "exact": exact if exact in ("gather", "dense") else "gather"}

    def lint(self, model: ir.Model, profiles: dict[str, int], facts: Json, capacity_factor: float) -> list[str]:
        return lint_tensorrt(model, topk_bound=topk_bound(profiles, facts, capacity_factor))

    def manifest_record(
        self, stages: list[Json], profiles: dict[str, int], model: Json, layers: list[Json], vision: Json | None = None
    ) -> Json:
        """engine.tensorrt: what `compile` builds plans for, one plan per graph file of every pipeline stage, and
        with `vision` (the manifest's engine.vision) the vision graph, the embedding step and the prefill graphs that
        take its hidden_states (`stages`: the build's stage records; plans: filled in by compile)."""
        files = stage_profiles(stages, profiles, model, layers)
        if vision is not None:
            files.update(vision_profiles(vision))
        return {"linted_for": TENSORRT_VERSION, "profiles": files, "plans": None}


def topk_bound(profiles: dict[str, int], model: Json, capacity_factor: float) -> int:
    """The largest TopK K of any graph under the profiles: the capacity dispatch's slots per expert at
    max_batch x prefill_tokens tokens, or top_k (the router's)."""
    tokens = profiles["max_batch"] * profiles["prefill_tokens"]
    capacity = min(tokens, math.ceil(capacity_factor * tokens * model["top_k"] / model["num_experts"]))
    return max(capacity, model["top_k"])


TARGET = TensorRTTarget()
__all__ = ["TARGET", "TargetError", "TensorRTTarget", "topk_bound"]
