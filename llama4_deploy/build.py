"""Build driver: checkpoint (or seeded random weights) -> bundle directory.

Stages: load -> trace -> link -> lower -> lint -> save -> manifest + golden + file hashes. The
bundle is written into a staging directory beside --out and renamed into place only when
complete; the --out policy, lock and staging live in outdir.py.
"""

from __future__ import annotations

import dataclasses
import resource
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from llama4_deploy.outdir import OutDirError, Staging, check_out
from llama4_deploy.recipe import Recipe, load_recipe
from llama4_deploy.runtime.bundle import GOLDEN, MANIFEST, BundleError, write_manifest
from llama4_deploy.runtime.integrity import CHUNK_KEY, LAYOUT_KEY, hash_files, layout_fingerprint
from llama4_deploy.runtime.tokenizer import Tokenizer

DATA_FILE = "weights.data"
# context of a build from a bare --checkpoint: the checkpoint's max_position_embeddings, capped here
# (Scout and Maverick declare 10M tokens; the cache is sized by the filled context, so a higher cap
# costs nothing until used, but TensorRT profiles and golden checks are planned at this length)
DEFAULT_MAX_CONTEXT = 32768


class BuildError(ValueError):
    """A build that cannot proceed; the message is one sentence for the user."""


@dataclasses.dataclass
class BuildResult:
    bundle: Path
    seconds: float
    peak_rss_mb: float
    passes: dict[str, int]
    manifest: dict[str, Any]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _check_expected(recipe: Recipe, shape) -> None:
    facts = shape.to_dict()
    for key, want in recipe.expect_config.items():
        got = facts.get(key)
        if isinstance(got, tuple):
            got = list(got)
        if got != want:
            raise BuildError(f"checkpoint has {key}={got!r}, but recipe {recipe.name} expects {want!r}; is it the right model?")


def _check_weights(checkpoint, shape) -> None:
    from llama4_deploy.export.weights import all_weights

    for source in all_weights(shape).values():
        if not checkpoint.has(source.checkpoint_name):
            raise BuildError(f"tensor {checkpoint.prefix}{source.checkpoint_name} is missing from the checkpoint")
        got = checkpoint.tensor_shape(source.checkpoint_name)
        if got != source.checkpoint_shape:
            raise BuildError(
                f"tensor {checkpoint.prefix}{source.checkpoint_name} has shape {list(got)}, "
                f"config.json implies {list(source.checkpoint_shape)}"
            )


def _lazy_weight(checkpoint, source, name: str, rewrite=None):
    """A tensor the saver reads from the checkpoint when it writes it, converted to fp32 and
    checked for NaN/Inf on the way (in memory, as it streams: no extra pass over the checkpoint)."""
    import onnx_ir as ir

    dims = list(source.checkpoint_shape)
    if source.transpose:
        dims[-2], dims[-1] = dims[-1], dims[-2]

    def read():
        import torch

        tensor = checkpoint.tensor(source.checkpoint_name).to(torch.float32)
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            raise BuildError(f"checkpoint tensor {checkpoint.prefix}{source.checkpoint_name} holds "
                             f"{int((~finite).sum())} NaN or Inf values; the build refuses non-finite weights")
        if source.transpose:
            tensor = tensor.transpose(-1, -2)
        array = tensor.contiguous().numpy()
        return ir.tensor(array if rewrite is None else rewrite(array), name=name)

    return ir.LazyTensor(read, dtype=ir.DataType.FLOAT, shape=ir.Shape(dims), name=name)


def graph_inputs(shape):
    """The engine ABI's inputs (docs/engine-abi.md)."""
    import onnx_ir as ir

    def value(name, dtype, dims):
        return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(dims))

    inputs = [
        value("input_ids", ir.DataType.INT64, ["batch", "new"]),
        value("position_ids", ir.DataType.INT64, ["batch", "new"]),
        value("past_lengths", ir.DataType.INT64, ["batch"]),
    ]
    for layer, kind in enumerate(shape.layer_kinds):
        slots = "ring" if kind.rope else "context"  # min(C, bucket) slots, or the context bucket
        dims = ["batch", shape.num_kv_heads, slots, shape.head_dim]
        inputs.append(value(f"past_key.{layer}", ir.DataType.FLOAT, dims))
        inputs.append(value(f"past_value.{layer}", ir.DataType.FLOAT, dims))
    return inputs


def link_model(checkpoint, templates, rewrites=None):
    """`rewrites`: weight name -> a function applied to that weight as it streams (AWQ's scales, export/awq.py)."""
    from llama4_deploy.export import weights
    from llama4_deploy.graphs.link import Stamp, link

    shape = checkpoint.shape

    def stamp_weights(prefix, sources):
        return {k: _lazy_weight(checkpoint, s, f"{prefix}.{k}", (rewrites or {}).get(f"{prefix}.{k}"))
                for k, s in sources.items()}

    from llama4_deploy.export.modules import Prologue

    prologue_inputs = {"position_ids": "position_ids", "past_lengths": "past_lengths"}
    for scope, rope in (("chunked", True), ("global", False)):
        layers = [i for i, is_rope in enumerate(shape.rope_layers) if is_rope == rope]
        if layers:  # the prologue reads only this cache's slot count
            prologue_inputs[f"{scope}_past_key"] = f"past_key.{layers[0]}"
    stamps = [
        Stamp("embed", "embed", {"input_ids": "input_ids"}, stamp_weights("embed", weights.embed_weights(shape))),
        Stamp("prologue", "prologue", prologue_inputs, {}),
    ]
    shared = {name: f"prologue.{name}" for name in Prologue.outputs(shape)}
    hidden = "embed.hidden_states"
    outputs = {}
    for layer, kind in enumerate(shape.layer_kinds):
        prefix = f"layers.{layer}"
        bindings = {
            **shared,
            "hidden_states": hidden,
            "past_key": f"past_key.{layer}",
            "past_value": f"past_value.{layer}",
        }
        sources = weights.layer_weights(shape, layer, kind)
        stamps.append(Stamp(kind.name, prefix, bindings, stamp_weights(prefix, sources)))
        hidden = f"{prefix}.hidden_states_out"
        outputs[f"present_key.{layer}"] = f"{prefix}.present_key"
        outputs[f"present_value.{layer}"] = f"{prefix}.present_value"
    stamps.append(Stamp("head", "head", {"hidden_states": hidden}, stamp_weights("head", weights.head_weights(shape))))
    model, stamped = link(templates, graph_inputs(shape), stamps, {"logits": "head.logits", **outputs})
    model.metadata_props[CHUNK_KEY] = str(shape.attention_chunk_size)  # checked at load (integrity.py)
    return model, stamped


def _random_checkpoint(recipe: Recipe, directory: Path) -> None:
    from llama4_deploy.export.reference import random_model

    r = recipe.random
    random_model(r.config, r.seed, r.logit_gain, r.router_gain).save_pretrained(directory)


def _source_record(recipe: Recipe, checkpoint_dir: Path | None) -> dict[str, Any]:
    if checkpoint_dir is not None:
        return {"kind": "checkpoint", "path": str(checkpoint_dir)}
    return {"kind": "random", "recipe": recipe.name, "random": recipe.random.model_dump()}


def _manifest(recipe: Recipe, shape, source, passes, graphs, layout: str, has_tokenizer: bool, has_tokenizer_config: bool,
              seconds: float) -> dict[str, Any]:
    import onnx
    import onnxruntime
    import torch
    import transformers

    layers = [
        {
            "index": i,
            "attention": "chunked" if kind.rope else "global",
            "cache_slots": shape.attention_chunk_size if kind.rope else None,
            "moe": kind.moe,
        }
        for i, kind in enumerate(shape.layer_kinds)
    ]
    io_names = ["input_ids", "position_ids", "past_lengths"] + [
        f"past_{kv}.{i}" for i in range(shape.num_layers) for kv in ("key", "value")
    ]
    return {
        "name": recipe.name,
        "model": shape.to_dict(),
        "layers": layers,
        "engine": {
            "backend": recipe.backend,
            "precision": recipe.precision,
            "graphs": graphs,
            "external_data": DATA_FILE,
            "weights_layout": layout,  # every graph's metadata_props carries the same (runtime/integrity.py)
            "inputs": io_names,
            "outputs": ["logits"] + [f"present_{kv}.{i}" for i in range(shape.num_layers) for kv in ("key", "value")]
            + (["moe_overflow"] if any(g["reports_overflow"] for g in graphs.values()) else []),
            "cache_dtype": "float32",
            "logits_dtype": "float32",
        },
        "profiles": recipe.profiles.model_dump(),
        "tokenizer": "tokenizer.json" if has_tokenizer else None,
        "tokenizer_config": "tokenizer_config.json" if has_tokenizer_config else None,
        "source": source,
        "verify": recipe.verify.model_dump(),
        "golden": GOLDEN,
        "build": {
            "recipe": recipe.name,
            "moe_dispatch": recipe.moe_dispatch,
            "passes": passes,
            "seconds": round(seconds, 1),
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
            },
        },
    }


def _write_golden(staging: Path, shape) -> None:
    """Engine outputs for a fixed short prompt, for comparing later backends without torch."""
    from llama4_deploy.runtime import load

    ids = [int(i) for i in np.random.default_rng(0).integers(0, shape.vocab_size, size=8)]
    with load(staging, verify_files=False) as engine:  # the hashes are recorded after this
        np.savez(staging / GOLDEN, input_ids=np.array(ids), logits=engine.score(ids, mode="prefill"))


def build(
    recipe: str | None = None,
    checkpoint: str | Path | None = None,
    out: str | Path | None = None,
    moe_dispatch: str | None = None,
    log: Callable[[str], None] = _log,
    attention: str | None = None,
    max_context: int | None = None,
    max_batch: int | None = None,
    prefill_tokens: int | None = None,
    force: bool = False,
    precision: str | None = None,
    compute_dtype: str | None = None,
    block_size: int | None = None,
    quant_form: str | None = None,
    calibration: str | Path | None = None,
    quant_method: str | None = None,
) -> BuildResult:
    """Build a bundle. `recipe` names a recipe (default `tiny`, or a plain fp32 ONNX Runtime
    build when only `checkpoint` is given); `checkpoint` is a Hugging Face checkpoint dir;
    `moe_dispatch` overrides the recipe's (dense, gather, capacity, native or auto), and
    `attention` its attention form (decomposed, onnx23 or auto). `max_context`, `max_batch` and
    `prefill_tokens` override the recipe's profiles; a bare checkpoint's context defaults to its
    max_position_embeddings, at most DEFAULT_MAX_CONTEXT. `out` may hold only a bundle this tool
    wrote (or nothing) unless `force` (outdir.py). `precision` (fp32, fp16, bf16, fp8, int4),
    `compute_dtype`, `block_size` (int4: 32, 64, 128), `quant_form` (qdq, ort, auto) and
    `calibration` (a text or JSON file, fp8 and awq) and `quant_method` (rtn, awq: int4) override the recipe's
    precision plan."""
    from llama4_deploy.graphs.dispatch import CHOICES
    from llama4_deploy.graphs.lower_attention import FORMS

    start = time.time()
    bare_checkpoint = recipe is None and checkpoint is not None
    if bare_checkpoint:
        chosen = Recipe(name=Path(checkpoint).resolve().name, description=f"fp32 ONNX Runtime build of {checkpoint}")
    else:
        chosen = load_recipe(recipe or "tiny")
    overrides = {key: value for key, value in (("max_context", max_context), ("max_batch", max_batch),
                                                ("prefill_tokens", prefill_tokens)) if value is not None}
    chosen = _with_profiles(chosen, overrides)
    if moe_dispatch is not None:
        if moe_dispatch not in CHOICES:
            raise BuildError(f"unknown MoE dispatch {moe_dispatch!r}; choose one of {', '.join(CHOICES)}")
        chosen = chosen.model_copy(update={"moe_dispatch": moe_dispatch})
    if attention is not None:
        if attention not in (*FORMS, "auto"):
            raise BuildError(f"unknown attention form {attention!r}; choose one of {', '.join((*FORMS, 'auto'))}")
        chosen = chosen.model_copy(update={"attention": attention})
    chosen = _with_precision(chosen, precision, compute_dtype, block_size, quant_form, calibration, quant_method)
    out = Path(out or Path("build") / chosen.name).resolve()
    if checkpoint is None and chosen.checkpoint_path is not None:
        checkpoint = chosen.checkpoint_path  # shipped with the repository (recipes/tiny-trained.yaml)
    if checkpoint is None and chosen.random is None:
        raise BuildError(
            f"recipe {chosen.name} needs a checkpoint: run make engine MODEL={chosen.name} CHECKPOINT=/path "
            f"(or llama4-deploy build --recipe {chosen.name} --checkpoint DIR)"
        )
    try:
        check_out(out, force, None if checkpoint is None else Path(checkpoint))
        with Staging(out) as staging:
            if staging.removed_stale:
                log(f"[out] removed {len(staging.removed_stale)} staging dir(s) of killed builds: "
                    f"{', '.join(staging.removed_stale)}")
            manifest, passes = _build_into(chosen, checkpoint, staging, log, start,
                                            context_from_checkpoint=bare_checkpoint and max_context is None)
            staging.commit()
    except OutDirError as err:
        raise BuildError(str(err)) from None
    seconds = time.time() - start
    return BuildResult(out, seconds, _peak_rss_mb(), passes, manifest)


def _with_profiles(recipe: Recipe, overrides: dict[str, int]) -> Recipe:
    """The recipe with some profile keys replaced, validated like a recipe's own."""
    from pydantic import ValidationError

    from llama4_deploy.recipe import Profiles

    if not overrides:
        return recipe
    try:
        profiles = Profiles.model_validate({**recipe.profiles.model_dump(), **overrides})
    except ValidationError as err:
        first = err.errors()[0]
        raise BuildError(f"{'--' + str(first['loc'][0]).replace('_', '-')} {first['input']!r}: {first['msg'].lower()}") from None
    return recipe.model_copy(update={"profiles": profiles})


def _build_into(chosen: Recipe, checkpoint, staging: Staging, log, start: float, context_from_checkpoint: bool):
    """Every stage, written into the staging dir; returns (manifest, pass counts). With
    `context_from_checkpoint`, the context is the checkpoint's max_position_embeddings (capped)."""
    from llama4_deploy.export.checkpoint import Checkpoint, CheckpointError

    bundle = staging.dir
    if checkpoint is None:
        log(f"[load] recipe {chosen.name}: seeded random weights (seed {chosen.random.seed})")
        source_dir = staging.scratch / "checkpoint"
        _random_checkpoint(chosen, source_dir)
    else:
        source_dir = Path(checkpoint)
        log(f"[load] checkpoint {source_dir}")
    try:
        ckpt = Checkpoint(source_dir)
        _check_expected(chosen, ckpt.shape)
        _check_weights(ckpt, ckpt.shape)
        if ckpt.tokenizer_file is not None:  # copied into the bundle: refuse a damaged one now, not at run time
            Tokenizer(ckpt.tokenizer_file)
    except (CheckpointError, BundleError) as err:
        raise BuildError(str(err)) from None
    shape = ckpt.shape
    if context_from_checkpoint:
        context = min(shape.max_position_embeddings, DEFAULT_MAX_CONTEXT)
        chosen = _with_profiles(chosen, {"max_context": context})
        log(f"[profiles] max context {context} tokens (the checkpoint's max_position_embeddings "
            f"{shape.max_position_embeddings}, capped at {DEFAULT_MAX_CONTEXT}; --max-context sets it)")
    if chosen.profiles.max_context > shape.max_position_embeddings:
        raise BuildError(f"max context {chosen.profiles.max_context} exceeds the checkpoint's "
                         f"max_position_embeddings of {shape.max_position_embeddings}")
    log(f"[profiles] {chosen.profiles.model_dump()}")
    spec = _quant_spec(chosen, ckpt)
    if ckpt.logical is not None:
        log(f"[precision] {ckpt.path.name} is pre-quantized FP8 (compressed-tensors): its FP8 weights and scales go "
            f"in as stored; its dynamic per-token activation scales become static per-tensor ones (calibration)")
    log(f"[precision] {spec.summary()}")
    amax, calibration_record, rewrites = _calibrate(chosen, spec, source_dir, ckpt, bundle, log)
    try:
        passes, graphs, layout = _compile(ckpt, chosen, bundle, log, spec, amax, rewrites)
    except CheckpointError as err:  # a tensor that fails to read while streaming
        raise BuildError(str(err)) from None
    if ckpt.tokenizer_file is not None:
        shutil.copyfile(ckpt.tokenizer_file, bundle / "tokenizer.json")
    if ckpt.tokenizer_config_file is not None:  # the chat template `serve` renders
        shutil.copyfile(ckpt.tokenizer_config_file, bundle / "tokenizer_config.json")
    source = _source_record(chosen, None if checkpoint is None else ckpt.path)
    manifest = _manifest(chosen, shape, source, passes, graphs, layout, ckpt.tokenizer_file is not None,
                         ckpt.tokenizer_config_file is not None, time.time() - start)
    _record_precision(manifest, spec, calibration_record)
    manifest["files"] = {}
    write_manifest(bundle, manifest)
    if spec.compute_dtype == "bfloat16":
        log("[golden] skipped: ONNX Runtime's CPU has no bfloat16 kernels to run the engine")
    else:
        log("[golden] engine logits for a fixed prompt")
        _write_golden(bundle, shape)
    shutil.rmtree(staging.scratch)
    t = time.time()
    manifest["files"] = hash_files(bundle, [p.name for p in bundle.iterdir() if p.name != MANIFEST])
    write_manifest(bundle, manifest)
    log(f"[hash] SHA-256 of {len(manifest['files'])} files in {time.time() - t:.1f}s")
    return manifest, passes


def _with_precision(recipe: Recipe, precision, compute_dtype, block_size, quant_form, calibration,
                    quant_method=None) -> Recipe:
    """The recipe with the build's precision overrides (None: the recipe's own)."""
    from pydantic import ValidationError

    update = {key: value for key, value in (("precision", precision), ("compute_dtype", compute_dtype),
                                            ("block_size", block_size), ("quant_form", quant_form),
                                            ("quant_method", quant_method),
                                            ("calibration", None if calibration is None else str(calibration)))
              if value is not None}
    if not update:
        return recipe
    try:
        return Recipe.model_validate({**recipe.model_dump(), **update})
    except ValidationError as err:
        first = err.errors()[0]
        raise BuildError(f"{first['loc'][0]} {update.get(first['loc'][0])!r} is not valid: {first['msg']}") from None


def _quant_spec(recipe: Recipe, ckpt=None):
    from llama4_deploy.export.compressed_tensors import CompressedTensorsError, checkpoint_quant_spec
    from llama4_deploy.graphs.quantize import QuantConfig, make_spec

    try:
        if ckpt is not None and ckpt.logical is not None:
            return checkpoint_quant_spec(ckpt, recipe.precision, recipe.compute_dtype, recipe.quant_form)
        return make_spec(QuantConfig(precision=recipe.precision, compute_dtype=recipe.compute_dtype,
                                     block_size=recipe.block_size, form=recipe.quant_form,
                                     method=recipe.quant_method), recipe.backend)
    except (ValueError, CompressedTensorsError) as err:
        raise BuildError(str(err)) from None


def _calibrate(recipe: Recipe, spec, source_dir: Path, ckpt, staging: Path, log):
    """Activation ranges for specs that quantize activations (fp8), AWQ scales for awq specs; stored in the bundle.
    Returns (ranges, record, AWQ weight rewrites by weight name or None)."""
    awq = any(rule.method == "awq" for rule in spec.rules)
    if awq:
        from llama4_deploy.export import awq as awq_search
        from llama4_deploy.export.calibrate import CalibrationError, calibration_ids

        try:
            ids = calibration_ids(recipe.calibration, ckpt, seed=recipe.random.seed if recipe.random else 0)
        except CalibrationError as err:
            raise BuildError(str(err)) from None
        log(f"[awq] scale search over {len(ids)} sequences, {sum(map(len, ids))} tokens"
            f" from {recipe.calibration or 'seeded random tokens'}")
        scales = awq_search.run(source_dir, ckpt, ids, spec.rules[0], log)
        record = {**awq_search.write_scales(staging, scales), "source": recipe.calibration or "seeded random tokens",
                  "sequences": len(ids), "tokens": sum(map(len, ids))}
        return None, record, awq_search.transforms(ckpt.shape, scales)
    if not spec.activations:
        if recipe.calibration is not None:
            raise BuildError(f"precision {spec.precision} quantizes no activations, so --calibration has no use")
        return None, None, None
    from llama4_deploy.export.calibrate import CalibrationError, calibration_ids, collect_amax, write_ranges

    try:
        ids = calibration_ids(recipe.calibration, ckpt, seed=recipe.random.seed if recipe.random else 0)
        log(f"[calibrate] {len(ids)} sequences, {sum(map(len, ids))} tokens"
            f" from {recipe.calibration or 'seeded random tokens'}")
        amax = collect_amax(source_dir, ids)
    except CalibrationError as err:
        raise BuildError(str(err)) from None
    record = write_ranges(staging, amax, recipe.calibration, ids)
    return amax, record, None


def _record_precision(manifest: dict[str, Any], spec, calibration: dict[str, Any] | None) -> None:
    engine = manifest["engine"]
    engine["precision"] = spec.precision
    engine["compute_dtype"] = spec.compute_dtype
    engine["quant_form"] = spec.form if spec.quantized else None
    engine["quantization"] = spec.model_dump(mode="json")
    engine["cache_dtype"] = engine["logits_dtype"] = spec.compute_dtype
    manifest["calibration"] = calibration
    if spec.compute_dtype == "bfloat16":
        manifest["golden"] = None


def _moe_lowering(strategy: str, recipe: Recipe, spec):
    from llama4_deploy.graphs import dispatch

    if strategy == "native" and spec.quantized:
        from llama4_deploy.graphs.lower_moe_native import lower_moe_native

        # quantized experts are 4-8x smaller than the fp32 ones the part split is sized for: keep them whole,
        # so each expert's weights are quantized exactly as the checkpoint lays them out
        return lambda model: lower_moe_native(model, split=1)
    return dispatch.lowering(strategy, recipe.capacity_factor)


def _compile(ckpt, recipe: Recipe, staging: Path, log, spec=None, activation_amax=None, rewrites=None
             ) -> tuple[dict[str, int], dict[str, dict[str, Any]], str]:
    """Trace, link, lower per engine role, quantize, lint, save. Returns (pass counts, graphs by role,
    weight layout)."""
    from llama4_deploy.export.compressed_tensors import stored_fp8
    from llama4_deploy.export.trace import trace_templates
    from llama4_deploy.graphs import dispatch
    from llama4_deploy.graphs.compute_dtype import convert_compute_dtype
    from llama4_deploy.graphs.lint import lint_static
    from llama4_deploy.graphs.lower_attention import form_for, lower_attention
    from llama4_deploy.graphs.quant_pass import quantize_model

    shape = ckpt.shape
    kinds = sorted({k.name for k in shape.layer_kinds})
    t = time.time()
    log(f"[trace] embed, head and {len(kinds)} layer kinds: {', '.join(kinds)}")
    templates = trace_templates(shape)
    log(f"[trace] done in {time.time() - t:.1f}s")
    passes: dict[str, int] = {}
    lowered: dict[str, Any] = {}
    attention = form_for(recipe.backend, recipe.attention)
    stored = stored_fp8(ckpt, shape)  # a pre-quantized checkpoint's FP8 weights, read as the saver writes them

    def lower(strategy: str):
        if strategy not in lowered:
            model, passes["link"] = link_model(ckpt, templates, rewrites)
            if spec is not None and spec.compute_dtype != "float32":
                passes[f"compute_dtype_{spec.compute_dtype}"] = convert_compute_dtype(model, spec.compute_dtype)
            count, skipped = _moe_lowering(strategy, recipe, spec)(model)
            if skipped:
                name, reason = next(iter(skipped.items()))
                raise BuildError(f"MoE node {name} was not lowered to {strategy}: it {reason}")
            passes[f"lower_attention_{attention}"], skipped = lower_attention(model, attention)
            if skipped:
                name, reason = next(iter(skipped.items()))
                raise BuildError(f"attention node {name} was not lowered to {attention}: it {reason}")
            if spec is not None and spec.quantized:
                try:
                    passes.update(quantize_model(model, spec, activation_amax, stored=stored))
                except ValueError as err:
                    raise BuildError(str(err)) from None
            problems = lint_static(model)
            if problems:
                raise BuildError(f"the {strategy} graph breaks the static-shape rule: {problems[0]}")
            passes[f"lower_moe_{strategy}"] = count
            lowered[strategy] = model
        return lowered[strategy]

    try:
        # fp8 activation scales cannot reach inside the fused MoE kernel (graphs/lower_quant_qdq.py)
        refusals = spec.dispatch_refusals(recipe.backend) if spec is not None else {}
        excluded = tuple(refusals)
        if recipe.moe_dispatch in refusals:
            raise BuildError(refusals[recipe.moe_dispatch])
        roles = dispatch.plan(recipe.moe_dispatch, recipe.backend, lower, shape.to_dict(), recipe.profiles.model_dump(),
                              recipe.capacity_factor, excluded=excluded)
    except ValueError as err:
        raise BuildError(str(err)) from None
    log(f"[dispatch] {recipe.moe_dispatch}: {roles}")
    used = {strategy: lower(strategy) for strategy in dict.fromkeys(roles.values())}
    log(f"[passes] {passes}")
    layout = _save_graphs(used, staging)
    graphs = {}
    for role, strategy in roles.items():
        graphs[role] = {"file": f"{strategy}.onnx", "moe_dispatch": strategy, "attention": attention,
                        "reports_overflow": strategy == "capacity"}
        if strategy == "capacity":
            graphs[role]["capacity_factor"] = recipe.capacity_factor
    return passes, graphs, layout


def _save_graphs(models: dict[str, Any], staging: Path) -> str:
    """Save each graph as `<strategy>.onnx`, all referencing one external-data file.

    The union of their initializers is written once (streamed, one tensor at a time) through a
    weights-only model, then each graph is saved pointing at those external tensors, carrying
    the fingerprint of that file's layout (returned) in its metadata_props.
    """
    import onnx_ir as ir
    from tqdm import tqdm

    union: dict[str, ir.Value] = {}
    for model in models.values():
        for name, value in model.graph.initializers.items():
            union.setdefault(name, value)
    holders = [ir.Value(name=name, type=value.type, shape=value.shape, const_value=value.const_value)
               for name, value in union.items()]
    weights = ir.Model(ir.Graph([], [], nodes=[], initializers=holders, opset_imports={"": 21}), ir_version=10)
    index = staging / "weights.onnx"
    with tqdm(total=sum(v.const_value.nbytes for v in holders), unit="B", unit_scale=True, desc="[save] weights",
              file=sys.stderr, disable=None) as bar:
        ir.save(weights, index, external_data=DATA_FILE, callback=lambda tensor, info: bar.update(tensor.nbytes))
    stored = ir.load(index).graph.initializers
    external = {name: v.const_value for name, v in stored.items() if isinstance(v.const_value, ir.ExternalTensor)}
    layout = layout_fingerprint((name, t.offset or 0, t.length, t.dtype.name, tuple(t.shape))
                                for name, t in external.items())
    for strategy, model in models.items():
        for name, value in model.graph.initializers.items():
            value.const_value = stored[name].const_value
        model.metadata_props[LAYOUT_KEY] = layout
        ir.save(model, staging / f"{strategy}.onnx")
    index.unlink()
    return layout
