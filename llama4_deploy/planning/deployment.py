"""Deployment plan from a config alone: parameters, bytes per precision, GPUs, context, stage split.

`llama4-deploy plan RECIPE|CHECKPOINT` answers "which GPUs, how much context" before anyone downloads
the weights. Everything is computed from the model's ModelShape (export/shape.py) and the precision
presets (graphs/quantize.py): no weights are read.

Sizes (letters: H hidden, D head_dim, K kv heads, C attention_chunk_size, T context, b batch rows, P
prefill tokens per row):

- Weights: every tensor the build reads (export/weights.py), one copy. A weight the precision spec
  quantizes is stored as fp8 (1 byte, one scale per output channel) or int4 (half a byte, one scale per
  block of `block_size` along the reduction axis, the last block of an axis partial); scales, and
  everything the spec leaves alone (router, embeddings, lm_head, norms), in the compute dtype. FP8's
  per-tensor activation scales are scalars and not counted.
- KV cache (dtype = compute dtype), per layer: b * 2 * K * D * slots, slots = min(C, T) for a chunked
  (RoPE) layer's ring and T for a global (NoPE) layer (runtime/kv_cache.py, docs/engine-abi.md).
- Workspace per GPU: RUNTIME_OVERHEAD (CUDA context, cuBLAS / TensorRT scratch) plus the activations of
  the engine profile's largest step, b * P tokens (TensorRT sizes activation memory for the profile's
  maximum): per token 4H (residual, normed input, attention out, MLP out) + 2 (Q + K + V) widths +
  3 max(2I, M) (gate/up, activation, capacity slack of the MoE dispatch) elements in the compute dtype,
  attention assumed fused (no [T, T] score matrix); the last stage adds b * P * vocab logits.
- A GPU's memory is its nvidia-smi total (GPUS); a plan fits when every stage's weights + KV + workspace
  does. Pipeline stages hold contiguous layers, embedding in the first and final norm + lm_head in the
  last; `balanced_split` picks the contiguous split whose largest stage is smallest.

Parameter counts are of the text model (what this project deploys); the published totals of the
multimodal checkpoints (109B, 400B) add the vision encoder (about 0.9B).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llama4_deploy.build.recipe import RecipeError, available, load_recipe, recipe_path
from llama4_deploy.build.stages import split_layers
from llama4_deploy.export.shape import ConfigError, ModelShape
from llama4_deploy.export.weights import WeightSource, embed_weights, head_weights, layer_weights
from llama4_deploy.graphs.forms import INT4_DEFAULTS

MIB = 1024**2
GIB = 1024**3
RUNTIME_OVERHEAD = 2 * GIB  # CUDA context (~0.5 GiB) + cuBLAS / TensorRT workspace
META_CONTEXT_CLAIM = 10_000_000  # Meta's "10M-token context" for Scout
PRECISION_PLANS = ("fp32", "bf16", "fp8", "int4")
STAGE_COUNTS = (1, 2, 4, 8)
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class PlanError(ValueError):
    """An input `plan` cannot size; the message is one sentence for the user."""


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int  # what nvidia-smi reports as total


GPUS = (GPU("H100 80GB", 81559 * MIB), GPU("H200 141GB", 143771 * MIB))


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    """What the plan is computed for (CLI flags map onto these)."""

    context: int = 32768  # reference context: the fit check and the stage balance are done here, at batch 1
    prefill_tokens: int = 2048  # most new tokens per row in one engine step (the recipe's profile)
    batches: tuple[int, ...] = (1, 8)
    compute_dtype: str = "bfloat16"  # of fp8 / int4 plans (fp32 and bf16 set their own); GPUs compute in 16 bits
    # int4 block along the reduction axis: TensorRT's (GPU plans are qdq)
    block_size: int = INT4_DEFAULTS["qdq"].block_size
    stage_counts: tuple[int, ...] = STAGE_COUNTS


@dataclasses.dataclass(frozen=True)
class ParameterCount:
    embed: int
    attention: int
    routed_experts: int
    shared_experts: int
    dense_mlp: int
    routers: int
    norms: int
    lm_head: int
    active: int  # per token: everything but the routed experts a token does not pick (embeddings included)

    @property
    def total(self) -> int:
        return (
            self.embed
            + self.attention
            + self.routed_experts
            + self.shared_experts
            + self.dense_mlp
            + self.routers
            + self.norms
            + self.lm_head
        )


@dataclasses.dataclass(frozen=True)
class Precision:
    """Bytes of one precision plan: per layer, plus embedding and head; what is quantized and what is not."""

    name: str
    compute_dtype: str
    embed_bytes: int
    head_bytes: int
    layer_bytes: tuple[int, ...]
    quantized_params: int
    quantized_bytes: int  # packed values
    scale_bytes: int
    plain_params: int  # left in the compute dtype
    plain_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.embed_bytes + self.head_bytes + sum(self.layer_bytes)

    @property
    def kv_bytes(self) -> int:
        return DTYPE_BYTES[self.compute_dtype]


@dataclasses.dataclass(frozen=True)
class Stage:
    layers: range
    weight_bytes: int
    kv_bytes: int
    workspace_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.workspace_bytes


@dataclasses.dataclass(frozen=True)
class Deployment:
    """One precision on `stages` GPUs of one kind, at a context and batch."""

    precision: str
    gpu: GPU
    context: int
    batch: int
    stages: tuple[Stage, ...]

    @property
    def fits(self) -> bool:
        return all(stage.total_bytes <= self.gpu.memory_bytes for stage in self.stages)

    @property
    def largest(self) -> Stage:
        return max(self.stages, key=lambda stage: stage.total_bytes)


def load_shape(target: str) -> tuple[ModelShape, str, dict[str, Any]]:
    """(shape, where it came from, the recipe's profiles or {}) for a recipe name/YAML or a checkpoint dir."""
    path = Path(target)
    if path.is_dir():
        return _checkpoint_shape(path), f"checkpoint {path}", {}
    if not recipe_path(target).is_file():
        raise PlanError(f"{target} is neither a recipe ({', '.join(available())}) nor a checkpoint directory")
    try:
        recipe = load_recipe(target)
    except RecipeError as err:
        raise PlanError(str(err)) from None
    profiles = recipe.profiles.model_dump()
    try:
        if recipe.published_config is not None:
            shape = ModelShape.from_config(recipe.published_config, source="published_config")
            return shape, f"recipe {recipe.name} (published config)", profiles
        if recipe.checkpoint_path is not None:
            return _checkpoint_shape(recipe.checkpoint_path), f"recipe {recipe.name} ({recipe.checkpoint})", profiles
        if recipe.random is not None:  # the shape the recipe's load validated, as transformers fills in its config
            return recipe.random.shape(), f"recipe {recipe.name} (random config)", profiles
    except ConfigError as err:
        raise PlanError(f"recipe {recipe.name}: {err}") from None
    raise PlanError(f"recipe {recipe.name} has no published_config, checkpoint or random config to plan from")


def _checkpoint_shape(path: Path) -> ModelShape:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise PlanError(f"{path} has no config.json; pass a Hugging Face checkpoint directory or a recipe")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PlanError(f"{config_path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise PlanError(f"{config_path} is not a JSON object")
    try:
        return ModelShape.from_config(config, source=str(config_path))
    except ConfigError as err:
        raise PlanError(str(err)) from None


# -- parameters ------------------------------------------------------------------------------------
def _numel(source: WeightSource) -> int:
    return math.prod(source.checkpoint_shape)


def count_parameters(shape: ModelShape) -> ParameterCount:
    parts = dict.fromkeys(("attention", "routed_experts", "shared_experts", "dense_mlp", "routers", "norms"), 0)
    for layer, kind in enumerate(shape.layer_kinds):
        for name, source in layer_weights(shape, layer, kind).items():
            part = (
                "norms"
                if name.endswith("norm")
                else "routers"
                if name == "router"
                else "routed_experts"
                if name.startswith("experts_")
                else "shared_experts"
                if name.startswith("shared_")
                else "dense_mlp"
                if name.startswith("mlp_")
                else "attention"
            )
            parts[part] += _numel(source)
    head = head_weights(shape)
    parts["norms"] += _numel(head["final_norm"])
    embed = _numel(embed_weights(shape)["embed"])
    lm_head = 0 if shape.tie_word_embeddings else _numel(head["lm_head"])
    unpicked = parts["routed_experts"] * (shape.num_experts - shape.top_k) // shape.num_experts
    total = embed + lm_head + sum(parts.values())
    return ParameterCount(embed=embed, lm_head=lm_head, active=total - unpicked, **parts)


# -- bytes per precision ---------------------------------------------------------------------------
def _deploy_dims(source: WeightSource) -> tuple[int, ...]:
    dims = list(source.checkpoint_shape)
    if source.transpose:  # deploy form is matmul layout [.., in, out]: the reduction axis is -2
        dims[-2], dims[-1] = dims[-1], dims[-2]
    return tuple(dims)


def _weight_bytes(name: str, source: WeightSource, spec, block_size: int) -> tuple[int, int, int]:
    """(packed bytes, scale bytes, plain bytes) of one weight under `spec`."""
    compute = DTYPE_BYTES[spec.compute_dtype]
    numel = _numel(source)
    rule = spec.rule_for(name)
    if rule is None:
        return 0, 0, numel * compute
    dims = _deploy_dims(source)
    reduction, outer = dims[-2], numel // dims[-2]
    if rule.weight == "fp8":
        return numel, outer * compute, 0
    blocks = -(-reduction // block_size)
    return outer * blocks * block_size // 2, outer * blocks * compute, 0


def precision_bytes(shape: ModelShape, precision: str, config: PlanConfig = PlanConfig()) -> Precision:
    # deferred: the CLI imports this module at start-up, and quantize brings numpy
    from llama4_deploy.graphs.quantize import QuantConfig, make_spec

    compute = (
        config.compute_dtype
        if precision in ("fp8", "int4")
        else {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[precision]
    )
    spec = make_spec(QuantConfig(precision=precision, compute_dtype=compute, block_size=config.block_size, form="qdq"))
    totals = {"quantized_params": 0, "quantized_bytes": 0, "scale_bytes": 0, "plain_params": 0, "plain_bytes": 0}

    def group(prefix: str, sources: dict[str, WeightSource]) -> int:
        size = 0
        for key, source in sources.items():
            packed, scales, plain = _weight_bytes(f"{prefix}.{key}", source, spec, config.block_size)
            kind = "plain" if plain else "quantized"
            totals[f"{kind}_params"] += _numel(source)
            totals[f"{kind}_bytes"] += plain or packed
            totals["scale_bytes"] += scales
            size += packed + scales + plain
        return size

    head = head_weights(shape)
    if shape.tie_word_embeddings:  # one tensor: stored once, with the embedding
        head = {"final_norm": head["final_norm"]}
    return Precision(
        name=precision,
        compute_dtype=compute,
        embed_bytes=group("embed", embed_weights(shape)),
        layer_bytes=tuple(
            group(f"layers.{i}", layer_weights(shape, i, kind)) for i, kind in enumerate(shape.layer_kinds)
        ),
        head_bytes=group("head", head),
        **totals,
    )


# -- memory per stage ------------------------------------------------------------------------------
def kv_bytes_per_slot(shape: ModelShape, precision: Precision) -> int:
    """One cached position of one layer: keys and values."""
    return 2 * shape.num_kv_heads * shape.head_dim * precision.kv_bytes


def layer_kv_bytes(shape: ModelShape, precision: Precision, layer: int, context: int, batch: int) -> int:
    slots = min(shape.attention_chunk_size, context) if shape.rope_layers[layer] else context
    return batch * slots * kv_bytes_per_slot(shape, precision)


def activation_bytes_per_token(shape: ModelShape, precision: Precision) -> int:
    widths = (
        4 * shape.hidden_size
        + 2 * (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim
        + 3 * max(2 * shape.intermediate_size, shape.intermediate_size_mlp)
    )
    return widths * DTYPE_BYTES[precision.compute_dtype]


def workspace_bytes(shape: ModelShape, precision: Precision, batch: int, prefill_tokens: int, last: bool) -> int:
    tokens = batch * prefill_tokens
    logits = tokens * shape.vocab_size * DTYPE_BYTES[precision.compute_dtype] if last else 0
    return RUNTIME_OVERHEAD + tokens * activation_bytes_per_token(shape, precision) + logits


def balanced_split(costs: Sequence[int], stages: int) -> list[range]:
    """Contiguous split of `costs` into `stages` non-empty ranges whose largest sum is the smallest possible:
    the build's own split (llama4_deploy/build/stages.py), over the plan's per-layer costs."""
    if not 1 <= stages <= len(costs):
        raise PlanError(f"cannot split {len(costs)} layers into {stages} stages")
    return [range(stage.start, stage.stop) for stage in split_layers(costs, stages)]


def stage_costs(shape: ModelShape, precision: Precision, context: int, batch: int, prefill_tokens: int) -> list[int]:
    """Per layer: weights + KV, with the embedding folded into the first layer and the head (weights and
    logits workspace) into the last, so a split of these is a split of the model."""
    costs = [w + layer_kv_bytes(shape, precision, i, context, batch) for i, w in enumerate(precision.layer_bytes)]
    costs[0] += precision.embed_bytes
    last_extra = workspace_bytes(shape, precision, batch, prefill_tokens, True) - workspace_bytes(
        shape, precision, batch, prefill_tokens, False
    )
    costs[-1] += precision.head_bytes + last_extra
    return costs


def deployment(
    shape: ModelShape,
    precision: Precision,
    gpu: GPU,
    stages: int,
    context: int,
    batch: int,
    prefill_tokens: int,
    split: list[range] | None = None,
) -> Deployment:
    split = split or balanced_split(stage_costs(shape, precision, context, batch, prefill_tokens), stages)
    built = []
    for s, layers in enumerate(split):
        weights = sum(precision.layer_bytes[i] for i in layers)
        weights += (precision.embed_bytes if s == 0 else 0) + (precision.head_bytes if s == len(split) - 1 else 0)
        kv = sum(layer_kv_bytes(shape, precision, i, context, batch) for i in layers)
        built.append(
            Stage(layers, weights, kv, workspace_bytes(shape, precision, batch, prefill_tokens, s == len(split) - 1))
        )
    return Deployment(precision.name, gpu, context, batch, tuple(built))


def longest_context(
    shape: ModelShape, precision: Precision, gpu: GPU, split: list[range], batch: int, prefill_tokens: int
) -> int:
    """Most tokens per row whose KV fits beside each stage's weights and workspace (0: nothing fits), at most
    max_position_embeddings. KV grows with every layer up to C tokens, then with the global layers only."""
    probe = deployment(shape, precision, gpu, len(split), 0, batch, prefill_tokens, split)
    chunk, per_slot = shape.attention_chunk_size, batch * kv_bytes_per_slot(shape, precision)
    best = shape.max_position_embeddings
    for stage in probe.stages:
        free = gpu.memory_bytes - stage.weight_bytes - stage.workspace_bytes
        chunked = sum(1 for i in stage.layers if shape.rope_layers[i])
        global_ = len(stage.layers) - chunked
        if free < per_slot * len(stage.layers):
            return 0
        if free <= per_slot * len(stage.layers) * chunk:
            best = min(best, free // (per_slot * len(stage.layers)))
        elif global_:
            best = min(best, (free - per_slot * chunked * chunk) // (per_slot * global_))
    return int(best)


def fewest_gpus(
    shape: ModelShape, precision: Precision, gpu: GPU, context: int, batch: int, prefill_tokens: int
) -> Deployment | None:
    """The smallest pipeline (one GPU per stage, at most one stage per layer) that fits, or None."""
    for stages in range(1, shape.num_layers + 1):
        plan = deployment(shape, precision, gpu, stages, context, batch, prefill_tokens)
        if plan.fits:
            return plan
    return None


# -- the report ------------------------------------------------------------------------------------
def _b(count: int) -> str:
    return f"{count / 1e9:.2f}B"


def _gib(size: int) -> str:
    return f"{size / GIB:.1f}"


def _context_cell(tokens: int, shape: ModelShape) -> str:
    if not tokens:
        return "-"
    return f"{tokens:,}" + ("*" if tokens == shape.max_position_embeddings else "")


def _ranges(split: Sequence[range]) -> str:
    return " | ".join(f"{r.start}-{r.stop - 1}" if len(r) > 1 else f"{r.start}" for r in split)


def report(
    shape: ModelShape,
    source: str,
    config: PlanConfig = PlanConfig(),
    stages: int | None = None,
    precision: str | None = None,
) -> str:
    """The tables `llama4-deploy plan` prints."""
    params = count_parameters(shape)
    plans = {name: precision_bytes(shape, name, config) for name in PRECISION_PLANS}
    chunked = sum(shape.rope_layers)
    lines = [
        f"plan for {source}: {shape.num_layers} layers ({len(shape.moe_layers)} MoE of {shape.num_experts} experts, "
        f"top-{shape.top_k}; {chunked} chunked at {shape.attention_chunk_size}, {shape.num_layers - chunked} global), "
        f"hidden {shape.hidden_size}, vocab {shape.vocab_size}, "
        f"max_position_embeddings {shape.max_position_embeddings}",
        "",
        "parameters (text model)",
        f"  total {_b(params.total)}, active per token {_b(params.active)} (embeddings and lm_head included)",
        f"  routed experts {_b(params.routed_experts)}, shared experts {_b(params.shared_experts)}, dense MLPs "
        f"{_b(params.dense_mlp)}, attention {_b(params.attention)}, embeddings {_b(params.embed)}, lm_head "
        f"{_b(params.lm_head)}, routers {params.routers / 1e6:.1f}M, norms {params.norms / 1e6:.2f}M",
        "  (the published totals of the multimodal checkpoints, 109B Scout and 400B Maverick, add the ~0.9B vision "
        "encoder: its table is at the end)",
        "",
        f"weights by precision plan (scales in the compute dtype; int4 blocks of {config.block_size} along the "
        f"reduction axis, fp8 one scale per output channel; router, embeddings, lm_head and norms unquantized)",
        f"  {'plan':<6}{'compute':>10}{'quantized':>11}{'packed GiB':>12}{'scales GiB':>12}{'plain GiB':>11}"
        f"{'total GiB':>11}{'total GB':>10}",
    ]
    for p in plans.values():
        lines.append(
            f"  {p.name:<6}{p.compute_dtype:>10}{_b(p.quantized_params):>11}{_gib(p.quantized_bytes):>12}"
            f"{p.scale_bytes / GIB:>12.2f}{_gib(p.plain_bytes):>11}{_gib(p.total_bytes):>11}"
            f"{p.total_bytes / 1e9:>10.1f}"
        )
    kv16 = plans["bf16"]
    slot = kv_bytes_per_slot(shape, kv16)
    lines += [
        "",
        f"KV cache ({kv16.compute_dtype}; fp32 doubles it): {slot * shape.num_layers // 1024} KiB per token while "
        f"the context is under {shape.attention_chunk_size}, then {slot * (shape.num_layers - chunked) // 1024} KiB "
        f"per token (global layers) plus {chunked} rings of {shape.attention_chunk_size} slots "
        f"({_gib(slot * chunked * shape.attention_chunk_size)} GiB) per row",
        "",
        f"per-GPU memory in GiB, largest stage, at {config.context:,} tokens, batch 1 (workspace: "
        f"{RUNTIME_OVERHEAD // GIB} GiB runtime + one step of {config.prefill_tokens} tokens per row); "
        f"longest context that fits at batch {' and '.join(map(str, config.batches))}",
        f"  {'plan':<6}{'GPU':<12}{'stages':>7}{'weights':>9}{'KV':>7}{'work':>7}{'total':>8}{'of':>7}  {'fits':<5}"
        + "".join(f"{f'ctx b{b}':>12}" for b in config.batches),
    ]
    fewest: dict[tuple[str, str], Deployment | None] = {}
    for p in plans.values():
        for gpu in GPUS:
            fewest[p.name, gpu.name] = best = fewest_gpus(shape, p, gpu, config.context, 1, config.prefill_tokens)
            counts = sorted(set(config.stage_counts) | ({len(best.stages)} if best else set()))
            for n in counts:
                if n > shape.num_layers:
                    continue
                d = deployment(shape, p, gpu, n, config.context, 1, config.prefill_tokens)
                split = [s.layers for s in d.stages]
                contexts = [longest_context(shape, p, gpu, split, b, config.prefill_tokens) for b in config.batches]
                big = d.largest
                lines.append(
                    f"  {p.name:<6}{gpu.name:<12}{n:>7}{_gib(big.weight_bytes):>9}{_gib(big.kv_bytes):>7}"
                    f"{_gib(big.workspace_bytes):>7}{_gib(big.total_bytes):>8}{_gib(gpu.memory_bytes):>7}  "
                    f"{'yes' if d.fits else 'no':<5}"
                    + "".join(f"{_context_cell(c, shape):>12}" for c in contexts)
                    + ("  <- fewest" if best is not None and n == len(best.stages) else "")
                )
    lines.append("  (ctx: tokens per row; * = max_position_embeddings, the model's own limit; - = not even one token)")
    lines += ["", "fewest GPUs (batch 1, reference context):"]
    for p in plans.values():
        parts = [f"{gpu.name} {len(d.stages) if d else 'none'}" for gpu in GPUS for d in [fewest[p.name, gpu.name]]]
        lines.append(f"  {p.name:<6}" + ", ".join(parts))

    claim = META_CONTEXT_CLAIM
    lines += [
        "",
        f"Meta's {claim // 1_000_000}M-token context, batch 1"
        + (
            f" (beyond this config's max_position_embeddings {shape.max_position_embeddings})"
            if claim > shape.max_position_embeddings
            else ""
        ),
    ]
    for name in ("bf16", "fp8", "int4"):
        p = plans[name]
        global_kv = sum(
            layer_kv_bytes(shape, p, i, claim, 1) for i in range(shape.num_layers) if not shape.rope_layers[i]
        )
        ring_kv = sum(layer_kv_bytes(shape, p, i, claim, 1) for i in range(shape.num_layers) if shape.rope_layers[i])
        needs = []
        for gpu in GPUS:
            d = fewest_gpus(shape, p, gpu, claim, 1, config.prefill_tokens)
            needs.append(
                f"{len(d.stages)} x {gpu.name}"
                if d
                else f"more than {shape.num_layers} x {gpu.name} (one layer's cache alone is too big)"
            )
        lines.append(
            f"  {name:<6}global layers' KV {global_kv / 1e9:.1f} GB ({_gib(global_kv)} GiB) + rings "
            f"{_gib(ring_kv)} GiB, weights {_gib(p.total_bytes)} GiB: {', '.join(needs)}"
        )

    chosen = plans[precision or "fp8"]
    gpu = GPUS[0]
    if stages is None:
        best = fewest[chosen.name, gpu.name]
        stages = len(best.stages) if best else min(8, shape.num_layers)
    d = deployment(shape, chosen, gpu, stages, config.context, 1, config.prefill_tokens)
    lines += [
        "",
        f"suggested stage split, {chosen.name} on {stages} x {gpu.name} (balances weights + KV at "
        f"{config.context:,} tokens; embedding in the first stage, final norm and lm_head in the last): "
        f"layers {_ranges([s.layers for s in d.stages])}",
        "  GiB per stage: " + ", ".join(_gib(s.total_bytes) for s in d.stages),
    ]
    return "\n".join(lines)


# the published Scout/Maverick vision config in full (export/vision.py PUBLISHED_VISION names the facts a checkpoint
# must match; these are the rest of its sizes), and their processor's tile cap
PUBLISHED_VISION_SIZES = {
    "intermediate_size": 5632,
    "projector_input_dim": 4096,
    "projector_output_dim": 4096,
    "vision_output_dim": 4096,
    "rope_parameters": {"rope_theta": 10000.0},
}
PUBLISHED_MAX_PATCHES = 16


def vision_of(target: str, shape: ModelShape):
    """(VisionShape, max_patches) of a plan target that has a vision tower, else None."""
    from llama4_deploy.export.vision_shape import (
        PUBLISHED_VISION,
        VisionConfigError,
        VisionShape,
        image_processor_config,
    )

    text = {"hidden_size": shape.hidden_size}
    path = Path(target)
    try:
        if path.is_dir():
            config = json.loads((path / "config.json").read_text())
            if not isinstance(config.get("vision_config"), dict):
                return None
            try:
                patches = int(image_processor_config(path).get("max_patches", PUBLISHED_MAX_PATCHES))
            except VisionConfigError:
                patches = PUBLISHED_MAX_PATCHES  # no processor files: the published processor's cap
            return VisionShape.from_config({"vision_config": config["vision_config"], "text_config": text}), patches
        recipe = load_recipe(target)
        if recipe.expect_vision:
            vision = {**PUBLISHED_VISION, **PUBLISHED_VISION_SIZES}
            return VisionShape.from_config({"vision_config": vision, "text_config": text}), PUBLISHED_MAX_PATCHES
        if recipe.random is not None and recipe.random.vision_config is not None:
            vision = {"vision_config": recipe.random.vision_config, "text_config": text}
            return VisionShape.from_config(vision), recipe.random.max_patches
    except VisionConfigError as err:
        raise PlanError(str(err)) from None
    return None


def image_tokens(vision, max_patches: int) -> int:
    """The most tokens one image becomes (Llama4Processor's layout): the largest grid of at most max_patches tiles
    with its separators, the global tile, and the start, <|image|> and end markers."""
    best = 0
    for rows in range(1, max_patches + 1):
        cols = max_patches // rows
        tiles = rows * cols
        grid = tiles * vision.tokens_per_tile + rows * (cols - 1) + rows if tiles > 1 else 0
        best = max(best, grid)
    return best + vision.tokens_per_tile + 3


def vision_report(vision, max_patches: int, shape: ModelShape, context: int) -> list[str]:
    """The vision engine's weights and the KV an image's tokens take, for `plan`."""
    params = sum(math.prod(dims) for dims in vision.weight_shapes().values())
    tokens = image_tokens(vision, max_patches)
    kv16 = precision_bytes(shape, "bf16")
    per_token = kv_bytes_per_slot(shape, kv16) * shape.num_layers  # every layer while under the chunk
    return [
        "",
        f"vision engine ({vision.num_layers} layers at hidden {vision.hidden_size}, tiles of {vision.image_size} "
        f"pixels, {vision.tokens_per_tile} tokens per tile, at most {max_patches} tiles + the global one per image)",
        f"  weights {_b(params)} parameters: {_gib(params * 4)} GiB as built (float32 at every precision: "
        f"Meta's FP8 release keeps the tower unquantized), {_gib(params * 2)} GiB in bf16; add them to the first "
        f"stage's weights above",
        f"  one image is at most {tokens:,} tokens: {_gib(tokens * per_token)} GiB of KV (bf16) per image, "
        f"{tokens * 100 / context:.1f}% of a {context:,}-token context",
    ]


def plan(target: str, context: int | None = None, stages: int | None = None, precision: str | None = None) -> str:
    """The report for a recipe or checkpoint dir; `context` defaults to the recipe's max_context (else 32768)."""
    shape, source, profiles = load_shape(target)
    config = PlanConfig(
        context=context if context is not None else profiles.get("max_context", PlanConfig.context),
        prefill_tokens=profiles.get("prefill_tokens", PlanConfig.prefill_tokens),
    )
    if config.context < 1:
        raise PlanError(f"--context {config.context} must be at least 1 token")
    if stages is not None and not 1 <= stages <= shape.num_layers:
        raise PlanError(f"--stages {stages} must be between 1 and the model's {shape.num_layers} layers")
    if precision is not None and precision not in PRECISION_PLANS:
        raise PlanError(f"--precision {precision!r} is not one of {', '.join(PRECISION_PLANS)}")
    text = report(shape, source, config, stages, precision)
    vision = vision_of(target, shape)
    if vision is not None:
        text += "\n" + "\n".join(vision_report(*vision, shape, config.context))
    return text
