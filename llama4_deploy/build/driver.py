"""Build driver: checkpoint (or seeded random weights) -> bundle directory.

Stages: load -> trace -> link -> lower -> lint -> save -> manifest + golden + file hashes. The
bundle is written into a staging directory beside --out and renamed into place only when
complete; the --out policy, lock and staging live in outdir.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import resource
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from llama4_deploy.build.cache import BuildCache, CacheError, checkpoint_identity, link_or_copy, step_key
from llama4_deploy.build.outdir import OutDirError, Staging, check_out
from llama4_deploy.build.recipe import Recipe, load_recipe
from llama4_deploy.runtime import abi
from llama4_deploy.runtime.bundle import GOLDEN, MANIFEST, BundleError, write_manifest
from llama4_deploy.runtime.integrity import hash_files
from llama4_deploy.build.clock import StageClock, timed
from llama4_deploy.runtime.tokenizer import Tokenizer

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
    # seconds per stage (load, trace, link, lower, quantize, lint, save, golden, hash) and when each ran
    stage_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    stage_spans: list[tuple[str, float, float]] = dataclasses.field(default_factory=list)  # (stage, start, end)


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
    checked for NaN/Inf on the way (in memory, as it streams: no extra pass over the checkpoint).
    Without a rewrite it also offers `stream()`: (the checkpoint's tensor as it is stored, a torch view in
    the checkpoint's dtype; `finish(fp32 tensor, name)`, the check), so a pass that re-lays it out
    (graphs/lower_moe_native.py) converts and re-lays in one copy."""
    import onnx_ir as ir

    dims = list(source.checkpoint_shape)
    if source.transpose:
        dims[-2], dims[-1] = dims[-1], dims[-2]

    def raw():
        tensor = checkpoint.tensor(source.checkpoint_name)
        return tensor.transpose(-1, -2) if source.transpose else tensor

    def finish(tensor, tensor_name: str):
        import torch

        # a sum with a NaN or Inf in it is never finite: one cheap reduction clears almost every tensor, and
        # only a non-finite sum (a bad value, or an overflow of large ones) pays for the element-wise check
        finite = torch.isfinite(tensor) if not bool(torch.isfinite(tensor.sum())) else None
        if finite is not None and not bool(finite.all()):
            raise BuildError(f"checkpoint tensor {checkpoint.prefix}{source.checkpoint_name} holds "
                             f"{int((~finite).sum())} NaN or Inf values; the build refuses non-finite weights")
        return ir.tensor(tensor.contiguous().numpy(), name=tensor_name)

    def read():
        import torch

        tensor = finish(raw().to(torch.float32), name)
        return tensor if rewrite is None else ir.tensor(rewrite(tensor.numpy()), name=name)

    lazy = ir.LazyTensor(read, dtype=ir.DataType.FLOAT, shape=ir.Shape(dims), name=name)
    if rewrite is None:
        lazy.stream = lambda: (raw(), finish)
    return lazy


def link_model(checkpoint, templates, rewrites=None):
    """The unsplit model: embed, prologue, every layer, head (llama4_deploy/build/stage_graphs.py). `rewrites`: weight
    name -> a function applied to that weight as it streams (AWQ's scales, export/awq.py)."""
    from llama4_deploy.build.stage_graphs import link_stage

    return link_stage(checkpoint, templates, _one_stage(checkpoint.shape),
                      lambda source, name: _lazy_weight(checkpoint, source, name, (rewrites or {}).get(name)))


def _one_stage(shape):
    from llama4_deploy.build.stages import Stage

    return Stage(0, 0, shape.num_layers, 1)


def _stage_split(shape, stages: int, log) -> list:
    """The layers of each pipeline stage (llama4_deploy/build/stages.py), balanced by weight bytes."""
    from llama4_deploy.build.stages import model_split

    if stages > shape.num_layers:
        raise BuildError(f"--stages {stages} exceeds the model's {shape.num_layers} layers; each stage needs at "
                         f"least one layer")
    split = model_split(shape, stages)
    if stages > 1:
        log(f"[stages] {stages} stages: " + ", ".join(f"layers {s.start}-{s.stop - 1}" for s in split))
    return split


def _random_checkpoint(recipe: Recipe, directory: Path) -> None:
    from llama4_deploy.export.reference import random_model

    r = recipe.random
    random_model(r.config, r.seed, r.logit_gain, r.router_gain).save_pretrained(directory)


def _source_record(recipe: Recipe, checkpoint_dir: Path | None) -> dict[str, Any]:
    if checkpoint_dir is not None:
        return {"kind": "checkpoint", "path": str(checkpoint_dir)}
    return {"kind": "random", "recipe": recipe.name, "random": recipe.random.model_dump()}


def _manifest(recipe: Recipe, shape, source, passes, graphs, stages: list[dict[str, Any]], has_tokenizer: bool,
              has_tokenizer_config: bool, seconds: float) -> dict[str, Any]:
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
    inputs, outputs = abi.stage_io(range(shape.num_layers), first=True, last=True,
                                   overflow=any(g["reports_overflow"] for g in graphs.values()))
    engine = {
        "backend": recipe.backend,
        "precision": recipe.precision,
        "graphs": graphs,
        "inputs": inputs,
        "outputs": outputs,
        "cache_dtype": "float32",
        "logits_dtype": "float32",
    }
    if len(stages) == 1:  # the unsplit layout: graph files in `graphs`, one weights.data
        for role, graph in graphs.items():
            graph["file"] = stages[0]["graphs"][role]["file"]
        engine["external_data"] = stages[0]["external_data"]
        engine["weights_layout"] = stages[0]["weights_layout"]  # every graph's metadata_props carries the same
    else:  # pipeline stages, each with its own graph files, weights and I/O (docs/engine-abi.md)
        # stage s on device s by default (a GPU per stage); load(..., devices=...) places them otherwise
        engine["stages"] = [{**stage, "device": stage["index"]} for stage in stages]
    return {
        "name": recipe.name,
        "model": shape.to_dict(),
        "layers": layers,
        "engine": engine,
        "profiles": recipe.profiles.model_dump(),
        "tokenizer": "tokenizer.json" if has_tokenizer else None,
        "tokenizer_config": "tokenizer_config.json" if has_tokenizer_config else None,
        "source": source,
        "verify": recipe.verify.model_dump(),
        "golden": GOLDEN,
        "build": {
            "recipe": recipe.name,
            "moe_dispatch": recipe.moe_dispatch,
            "stages": len(stages),
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


def _write_golden(staging: Path, shape, prepack: bool = False) -> None:
    """Engine outputs for a fixed short prompt, for comparing later backends without torch. `prepack`: int8
    activations (QuantSpec.int8_activations), whose kernels run only on prepacked weights."""
    from llama4_deploy.runtime import load

    ids = [int(i) for i in np.random.default_rng(0).integers(0, shape.vocab_size, size=8)]
    # the hashes are recorded after this; weights stay memory-mapped (no prepacked copies): O(layer) heap
    with load(staging, verify_files=False, prepack=prepack) as engine:
        _save_npz(staging / GOLDEN, input_ids=np.array(ids), logits=engine.score(ids, mode="prefill"))


def _save_npz(path: Path, **arrays) -> None:
    """np.savez's format with fixed zip timestamps, so the same arrays give the same bytes (np.savez
    stamps the current time into the archive)."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asanyarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buffer.getvalue())


def _cached_calibration(cache: BuildCache | None, inputs, bundle: Path, needed: bool, calibrate):
    """(activation ranges, calibration record) from `calibrate(directory)`, which writes its ranges
    file into `directory`; kept as a build step, so a resumed build does not calibrate again."""
    if cache is None or not needed:
        return calibrate(bundle)
    key = step_key("calibrate", inputs)
    hit = cache.get("calibrate", key)
    if hit is None:
        with cache.put("calibrate", key) as (directory, record):
            amax, calibration = calibrate(directory)
            record.update(amax=amax, calibration=calibration)
        hit = cache.entry("calibrate", key), record
    cache.link_files("calibrate", key, bundle)
    return hit[1]["amax"], hit[1]["calibration"]


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
    stages: int | None = None,
    extra_dispatches: tuple[str, ...] = (),
    target: str | None = None,
    quant_method: str | None = None,
    int4_compute: str | None = None,
) -> BuildResult:
    """Build a bundle. `recipe` names a recipe (default `tiny`, or a plain fp32 ONNX Runtime
    build when only `checkpoint` is given); `checkpoint` is a Hugging Face checkpoint dir;
    `moe_dispatch` overrides the recipe's (dense, gather, capacity, native or auto), and
    `attention` its attention form (decomposed, onnx23 or auto). `max_context`, `max_batch` and
    `prefill_tokens` override the recipe's profiles; a bare checkpoint's context defaults to its
    max_position_embeddings, at most DEFAULT_MAX_CONTEXT. `out` may hold only a bundle this tool
    wrote (or nothing) unless `force` (outdir.py). `precision` (fp32, fp16, bf16, fp8, int4),
    `compute_dtype`, `block_size` (int4: 32, 64, 128), `quant_form` (qdq, ort, auto) and
    `calibration` (a text or JSON file, fp8 and awq), `quant_method` (rtn, awq: int4) and `int4_compute`
    (float, int8: the ort form's int8-activation kernels) override the recipe's precision plan. `target` (onnxruntime,
    tensorrt) overrides the recipe's backend; tensorrt writes a TensorRT-form bundle (tensorrt_target.py).
    `stages` (the recipe's `stages`, default 1) splits the layers into that many pipeline-stage graphs
    (llama4_deploy/build/stages.py). `extra_dispatches` also saves graphs for these MoE dispatches, each
    under a role named after it, which the runtime opens but never steps on (tests and benchmarks
    compare dispatches in one bundle)."""
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
    chosen = _with_precision(chosen, precision, compute_dtype, block_size, quant_form, calibration, quant_method,
                             int4_compute)
    if stages is not None:
        if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
            raise BuildError(f"--stages {stages!r} is not a number of pipeline stages; give an integer of at least 1")
        chosen = chosen.model_copy(update={"stages": stages})
    unknown = [d for d in extra_dispatches if d not in CHOICES or d == "auto"]
    if unknown:
        raise BuildError(f"unknown MoE dispatch {unknown[0]!r} in extra_dispatches; choose from "
                         f"{', '.join(c for c in CHOICES if c != 'auto')}")
    chosen = _with_target(chosen, target, precision, compute_dtype)
    out = Path(out or Path("build") / chosen.name).resolve()
    if checkpoint is None and chosen.checkpoint_path is not None:
        checkpoint = chosen.checkpoint_path  # shipped with the repository (recipes/tiny-trained.yaml)
    if checkpoint is None and chosen.random is None:
        raise BuildError(
            f"recipe {chosen.name} needs a checkpoint: run make engine MODEL={chosen.name} CHECKPOINT=/path "
            f"(or llama4-deploy build --recipe {chosen.name} --checkpoint DIR)"
        )
    clock = StageClock()
    try:
        check_out(out, force, None if checkpoint is None else Path(checkpoint))
        with Staging(out) as staging, clock.running():
            if staging.removed_stale:
                log(f"[out] removed {len(staging.removed_stale)} staging dir(s) of killed builds: "
                    f"{', '.join(staging.removed_stale)}")
            cache = BuildCache(out, log).open()  # resumable steps (build_cache.py), under the lock
            resumable = True  # an interrupt or a crash keeps the finished steps for a rerun
            try:
                manifest, passes = _build_into(chosen, checkpoint, staging, log, start,
                                                context_from_checkpoint=bare_checkpoint and max_context is None,
                                                extra_dispatches=tuple(extra_dispatches), cache=cache)
                staging.commit()
                resumable = False
            except (ValueError, TypeError):  # bad input (one sentence): nothing is left on disk
                resumable = False
                raise
            finally:
                cache.close(keep=resumable)
    except (OutDirError, CacheError) as err:
        raise BuildError(str(err)) from None
    seconds = time.time() - start
    log(f"[stages] {', '.join(f'{k} {v:.1f}s' for k, v in clock.seconds.items())}")
    return BuildResult(out, seconds, _peak_rss_mb(), passes, manifest, dict(clock.seconds), list(clock.spans))


def _with_profiles(recipe: Recipe, overrides: dict[str, int]) -> Recipe:
    """The recipe with some profile keys replaced, validated like a recipe's own."""
    from pydantic import ValidationError

    from llama4_deploy.build.recipe import Profiles

    if not overrides:
        return recipe
    try:
        profiles = Profiles.model_validate({**recipe.profiles.model_dump(), **overrides})
    except ValidationError as err:
        first = err.errors()[0]
        raise BuildError(f"{'--' + str(first['loc'][0]).replace('_', '-')} {first['input']!r}: {first['msg'].lower()}") from None
    return recipe.model_copy(update={"profiles": profiles})


def _build_into(chosen: Recipe, checkpoint, staging: Staging, log, start: float, context_from_checkpoint: bool,
                extra_dispatches: tuple[str, ...], cache: BuildCache):
    """Every stage, written into the staging dir; returns (manifest, pass counts). With
    `context_from_checkpoint`, the context is the checkpoint's max_position_embeddings (capped).
    Steps found in `cache` under their key are reused, finished ones stored there (build_cache.py)."""
    from llama4_deploy.export.checkpoint import Checkpoint, CheckpointError

    bundle = staging.dir
    if checkpoint is None:
        key = step_key("checkpoint", chosen.random.model_dump(mode="json"))
        identity: Any = {"random checkpoint": key}
        if cache.get("checkpoint", key) is None:
            log(f"[load] recipe {chosen.name}: seeded random weights (seed {chosen.random.seed})")
            with cache.put("checkpoint", key) as (directory, _):
                _random_checkpoint(chosen, directory)
        source_dir = cache.entry("checkpoint", key)
    else:
        source_dir = Path(checkpoint)
        log(f"[load] checkpoint {source_dir}")
        identity = checkpoint_identity(source_dir) if source_dir.is_dir() else None
    try:
        with timed("load"):
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
    split = _stage_split(shape, chosen.stages, log)
    spec = _quant_spec(chosen, ckpt)
    if ckpt.logical is not None:
        log(f"[precision] {ckpt.path.name} is pre-quantized FP8 (compressed-tensors): its FP8 weights and scales go "
            f"in as stored; its dynamic per-token activation scales become static per-tensor ones (calibration)")
    log(f"[precision] {spec.summary()}")
    # what every later step reads: the recipe with its overrides, and which weights
    calibration_file = Path(chosen.calibration) if chosen.calibration else None
    calibration_identity = ([calibration_file.stat().st_size, calibration_file.stat().st_mtime_ns]
                            if calibration_file is not None and calibration_file.is_file() else None)
    inputs = [chosen.model_dump(mode="json"), identity, calibration_identity, list(extra_dispatches)]
    rewrites = None
    if any(rule.method == "awq" for rule in spec.rules):  # AWQ's rewrites are functions: not a cached step
        amax, calibration_record, rewrites = _calibrate(chosen, spec, source_dir, ckpt, bundle, log)
    else:
        amax, calibration_record = _cached_calibration(
            cache, inputs, bundle, spec.activations, lambda where: _calibrate(chosen, spec, source_dir, ckpt, where,
                                                                              log)[:2])
    try:
        passes, graphs, stages, stage_keys, file_records = _compile(ckpt, chosen, bundle, log, spec, amax, split,
                                                                    extra_dispatches, cache, inputs, rewrites)
    except CheckpointError as err:  # a tensor that fails to read while streaming
        raise BuildError(str(err)) from None
    if ckpt.tokenizer_file is not None:
        shutil.copyfile(ckpt.tokenizer_file, bundle / "tokenizer.json")
    if ckpt.tokenizer_config_file is not None:  # the chat template `serve` renders
        shutil.copyfile(ckpt.tokenizer_config_file, bundle / "tokenizer_config.json")
    source = _source_record(chosen, None if checkpoint is None else ckpt.path)
    manifest = _manifest(chosen, shape, source, passes, graphs, stages, ckpt.tokenizer_file is not None,
                         ckpt.tokenizer_config_file is not None, time.time() - start)
    _record_precision(manifest, spec, calibration_record)
    if chosen.backend == "tensorrt":
        from llama4_deploy.targets.tensorrt import manifest_record

        manifest["engine"]["tensorrt"] = manifest_record(stages, chosen.profiles.model_dump(), manifest["model"],
                                                         manifest["layers"])
    manifest["files"] = {}
    write_manifest(bundle, manifest)
    if spec.compute_dtype == "bfloat16":
        log("[golden] skipped: ONNX Runtime's CPU has no bfloat16 kernels to run the engine")
    else:
        key = step_key("golden", stage_keys)
        if cache.get("golden", key) is None:
            log("[golden] engine logits for a fixed prompt")
            with timed("golden"):
                _write_golden(bundle, shape, prepack=spec.int8_activations)
            with cache.put("golden", key) as (directory, _):
                link_or_copy(bundle / GOLDEN, directory / GOLDEN)
        else:
            cache.link_files("golden", key, bundle)
    shutil.rmtree(staging.scratch)
    t = time.time()
    # the stages' files were hashed when they were written (and stored with their cached step)
    with timed("hash"):
        fresh = hash_files(bundle, [p.name for p in bundle.iterdir() if p.name != MANIFEST and p.name not in file_records])
    manifest["files"] = dict(sorted({**file_records, **fresh}.items()))
    write_manifest(bundle, manifest)
    log(f"[hash] SHA-256 of {len(manifest['files'])} files in {time.time() - t:.1f}s")
    return manifest, passes


def _with_precision(recipe: Recipe, precision, compute_dtype, block_size, quant_form, calibration,
                    quant_method=None, int4_compute=None) -> Recipe:
    """The recipe with the build's precision overrides (None: the recipe's own)."""
    from pydantic import ValidationError

    update = {key: value for key, value in (("precision", precision), ("compute_dtype", compute_dtype),
                                            ("block_size", block_size), ("quant_form", quant_form),
                                            ("quant_method", quant_method), ("int4_compute", int4_compute),
                                            ("calibration", None if calibration is None else str(calibration)))
              if value is not None}
    if not update:
        return recipe
    try:
        return Recipe.model_validate({**recipe.model_dump(), **update})
    except ValidationError as err:
        first = err.errors()[0]
        raise BuildError(f"{first['loc'][0]} {update.get(first['loc'][0])!r} is not valid: {first['msg']}") from None


def _with_target(recipe: Recipe, target: str | None, precision: str | None, compute_dtype: str | None) -> Recipe:
    from llama4_deploy.targets.tensorrt import TARGETS, TargetError, configure

    if target is not None and target not in TARGETS:
        raise BuildError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if (target or recipe.backend) != "tensorrt":
        return recipe if target is None else recipe.model_copy(update={"backend": target})
    try:
        return configure(recipe, precision, compute_dtype)
    except TargetError as err:
        raise BuildError(str(err)) from None


def _quant_spec(recipe: Recipe, ckpt=None):
    from llama4_deploy.export.compressed_tensors import CompressedTensorsError, checkpoint_quant_spec
    from llama4_deploy.graphs.quantize import QuantConfig, make_spec

    try:
        if ckpt is not None and ckpt.logical is not None:
            return checkpoint_quant_spec(ckpt, recipe.precision, recipe.compute_dtype, recipe.quant_form)
        return make_spec(QuantConfig(precision=recipe.precision, compute_dtype=recipe.compute_dtype,
                                     block_size=recipe.block_size, form=recipe.quant_form,
                                     method=recipe.quant_method, int4_compute=recipe.int4_compute), recipe.backend)
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


def _moe_lowering(strategy: str, recipe: Recipe, spec, layout: str = "matmul"):
    """The MoE lowering of `strategy`; `layout` "native": a gather reading the native graph's expert weights
    (a bundle with both stores them once, graphs/lower_moe_gather.py)."""
    from llama4_deploy.graphs import dispatch

    # quantized experts are 4-8x smaller than the fp32 ones the part split is sized for: keep them whole,
    # so each expert's weights are quantized exactly as the checkpoint lays them out
    split = 1 if spec is not None and spec.quantized else None
    if strategy == "native" and split:
        from llama4_deploy.graphs.lower_moe_native import lower_moe_native

        return lambda model: lower_moe_native(model, split=split)
    if strategy == "gather" and layout == "native":
        from llama4_deploy.graphs.lower_moe_gather import lower_moe_gather

        return lambda model: lower_moe_gather(model, layout="native", split=split)
    return dispatch.lowering(strategy, recipe.capacity_factor, recipe.backend)


def _templates(shape, split, cache: BuildCache | None, log) -> dict[str, Any]:
    """The traced templates every stage needs, from the cache when a build traced them before."""
    from llama4_deploy.export.trace import load_templates, save_templates, trace_templates
    from llama4_deploy.build.stage_graphs import stage_prologue

    prologues = tuple(dict.fromkeys(stage_prologue(shape, stage) for stage in split))
    key = step_key("trace", shape.to_dict(), prologues)
    hit = cache.get("trace", key) if cache is not None else None
    if hit is not None:
        return load_templates(hit[0], hit[1]["templates"])
    kinds = sorted({k.name for k in shape.layer_kinds})
    t = time.time()
    log(f"[trace] embed, head and {len(kinds)} layer kinds: {', '.join(kinds)}")
    with timed("trace"):
        templates = trace_templates(shape, prologues)
    log(f"[trace] done in {time.time() - t:.1f}s")
    if cache is not None:
        with cache.put("trace", key) as (directory, record):
            save_templates(templates, directory)
            record["templates"] = list(templates)
    return templates


def _compile(ckpt, recipe: Recipe, staging: Path, log, spec=None, activation_amax=None, split=None,
             extra_dispatches: tuple[str, ...] = (), cache: BuildCache | None = None, inputs: Any = None,
             rewrites=None):
    """Trace, link, lower per engine role, quantize, lint, save, per pipeline stage of `split` (default:
    one stage). Returns (pass counts summed over stages, graph records by role, stage records, the
    stages' step keys, file records of the stages' files). With a `cache`, the trace, the dispatch
    plan and each stage are steps kept under a key of `inputs` and reused by a later build."""
    from llama4_deploy.export.compressed_tensors import stored_fp8
    from llama4_deploy.graphs import dispatch
    from llama4_deploy.graphs.lower_attention import form_for
    from llama4_deploy.build.stage_graphs import costing_layers, data_file, graph_file, save_stage_graphs, stage_io

    shape = ckpt.shape
    split = split or [_one_stage(shape)]
    templates = _templates(shape, split, cache, log)
    attention = form_for(recipe.backend, recipe.attention)
    lowered: dict[tuple[int, int, str], Any] = {}
    plan_passes: dict[str, int] = {}
    stored = stored_fp8(ckpt, shape)  # a pre-quantized checkpoint's FP8 weights, read as the saver writes them

    def lower(stage, strategy: str, passes: dict[str, int], layout: str = "matmul"):
        key = (stage.count, stage.index, strategy, layout)
        if key not in lowered:
            lowered[key], counts = _lower_stage(ckpt, templates, stage, strategy, recipe, spec, activation_amax,
                                                attention, rewrites, stored, layout=layout)
            passes.update(counts)
        return lowered[key]

    full = _one_stage(shape)
    costing, priced_graphs = costing_layers(shape), {}

    def priced(strategy: str):
        """A candidate as the planner prices it: one layer per kind, each counted as often as the model has it
        (stage_graphs.CostingLayers), which costs the same as the whole graph for a fraction of the shape
        inference. The whole graph is lowered too: its pass counts are the build's, and a chosen one is saved."""
        if strategy not in priced_graphs:
            lower(full, strategy, plan_passes)
            model, _ = _lower_stage(ckpt, templates, costing, strategy, recipe, spec, activation_amax, attention,
                                    rewrites, stored, checks=False)
            priced_graphs[strategy] = dispatch.Priced(model, costing.multiplicity)
        return priced_graphs[strategy]

    plan_key = step_key("plan", inputs)
    planned = cache.get("plan", plan_key) if cache is not None else None
    if planned is not None:
        roles, plan_passes = planned[1]["roles"], planned[1]["passes"]
    else:
        try:
            # fp8 activation scales cannot reach inside the fused MoE kernel (graphs/lower_quant_qdq.py)
            refusals = spec.dispatch_refusals(recipe.backend) if spec is not None else {}
            excluded = tuple(refusals)
            for wanted in (recipe.moe_dispatch, *extra_dispatches):
                if wanted in refusals:
                    raise BuildError(refusals[wanted])
            # priced on the unsplit model: every stage gets the same dispatch per role
            with timed("dispatch"):  # costs every candidate lowering (its link and lower count as theirs)
                roles = dispatch.plan(recipe.moe_dispatch, recipe.backend, priced, shape.to_dict(),
                                      recipe.profiles.model_dump(), recipe.capacity_factor, excluded=excluded)
        except ValueError as err:
            raise BuildError(str(err)) from None
        if recipe.backend == "tensorrt":
            from llama4_deploy.targets.tensorrt import roles as tensorrt_roles

            roles = tensorrt_roles(recipe.moe_dispatch, roles)
        if cache is not None:
            with cache.put("plan", plan_key) as (_, record):
                record.update(roles=roles, passes=plan_passes)
    log(f"[dispatch] {recipe.moe_dispatch}: {roles}")
    for strategy in extra_dispatches:  # saved beside the roles' graphs, under a role named after the strategy
        roles.setdefault(strategy, strategy)
    strategies = list(dict.fromkeys(roles.values()))
    # beside a native graph, the gather reads the native layout: one copy of the experts, not two
    layouts = {"gather": "native"} if "native" in strategies else {}
    kept = {(1, 0, s, layouts.get(s, "matmul")) for s in strategies} if split[0].count == 1 else set()
    for key in set(lowered) - kept:
        del lowered[key]  # graphs that only priced the candidates
    passes: dict[str, int] = {}
    stages, stage_keys, file_records = [], [], {}
    for stage in split:
        key = step_key("stage", inputs, [stage.index, stage.start, stage.stop, stage.count], roles)
        stage_keys.append(key)
        step = f"stage{stage.index}"
        hit = cache.get(step, key) if cache is not None else None
        if hit is None:
            stage_passes = dict(plan_passes) if stage.count == 1 else {}
            models = {strategy: lower(stage, strategy, stage_passes, layouts.get(strategy, "matmul"))
                      for strategy in strategies}
            if stage.count > 1:
                log(f"[stage {stage.index}] layers {stage.start}-{stage.stop - 1}: {len(models)} graphs")
            with contextlib.ExitStack() as scope:
                directory, record = scope.enter_context(cache.put(step, key)) if cache is not None else (staging, {})
                with timed("save"):
                    layout, data_record = save_stage_graphs(models, directory, stage)
                overflow = {s for s, model in models.items()
                            if any(o.name == "moe_overflow" for o in model.graph.outputs)}
                stage_inputs, stage_outputs = stage_io(shape, stage)
                record["stage"] = {
                    "index": stage.index,
                    "layers": [stage.start, stage.stop],
                    "graphs": {role: {"file": graph_file(stage, s), "reports_overflow": s in overflow}
                               for role, s in roles.items()},
                    "external_data": data_file(stage),
                    "weights_layout": layout,  # every graph of the stage carries it in its metadata_props
                    "inputs": stage_inputs,
                    "outputs": stage_outputs + (["moe_overflow"] if overflow else []),
                }
                record["passes"] = stage_passes
                files = {**hash_files(directory, [graph_file(stage, s) for s in strategies]), data_file(stage): data_record}
                record["files"] = dict(sorted(files.items()))
            for strategy in strategies:
                lowered.pop((stage.count, stage.index, strategy, layouts.get(strategy, "matmul")), None)  # saved: free
        else:
            record = hit[1]
        if cache is not None:
            cache.link_files(step, key, staging)
        stages.append(record["stage"])
        file_records.update(record["files"])
        for name, count in record["passes"].items():  # summed over stages
            passes[name] = passes.get(name, 0) + count
    log(f"[passes] {passes}")
    graphs = {}
    for role, strategy in roles.items():
        graphs[role] = {"moe_dispatch": strategy, "attention": attention,
                        "reports_overflow": any(st["graphs"][role]["reports_overflow"] for st in stages)}
        if strategy == "capacity":
            graphs[role]["capacity_factor"] = recipe.capacity_factor
    return passes, graphs, stages, stage_keys, file_records


def _lower_stage(ckpt, templates, stage, strategy: str, recipe: Recipe, spec, activation_amax, attention: str,
                 rewrites=None, stored=None, checks: bool = True, layout: str = "matmul"):
    """One stage's graph for one MoE dispatch: link, compute dtype, MoE and attention lowering,
    quantization, static-shape lint (and the TensorRT checks; not with `checks` False: a graph that is only
    priced). Returns (model, pass counts)."""
    from llama4_deploy.graphs.compute_dtype import convert_compute_dtype
    from llama4_deploy.graphs.lint import lint_static
    from llama4_deploy.graphs.lower_attention import lower_attention
    from llama4_deploy.graphs.quant_pass import quantize_model
    from llama4_deploy.build.stage_graphs import link_stage

    counts: dict[str, int] = {}
    with timed("link"):
        model, counts["link"] = link_stage(ckpt, templates, stage,
                                           lambda source, name: _lazy_weight(ckpt, source, name,
                                                                             (rewrites or {}).get(name)))
    with timed("lower"):
        if spec is not None and spec.compute_dtype != "float32":
            counts[f"compute_dtype_{spec.compute_dtype}"] = convert_compute_dtype(model, spec.compute_dtype)
        count, skipped = _moe_lowering(strategy, recipe, spec, layout)(model)
        if skipped:
            name, reason = next(iter(skipped.items()))
            raise BuildError(f"MoE node {name} was not lowered to {strategy}: it {reason}")
        counts[f"lower_attention_{attention}"], skipped = lower_attention(model, attention)
        if skipped:
            name, reason = next(iter(skipped.items()))
            raise BuildError(f"attention node {name} was not lowered to {attention}: it {reason}")
    if spec is not None and spec.quantized:
        try:
            with timed("quantize"):  # the graph rewrite; the numbers are computed as `save` streams
                counts.update(quantize_model(model, spec, activation_amax, per_expert=recipe.backend == "tensorrt",
                                             stored=stored))
        except ValueError as err:
            raise BuildError(str(err)) from None
    if not checks:
        return model, counts
    with timed("lint"):
        problems = lint_static(model)
    if problems:
        raise BuildError(f"the {strategy} graph breaks the static-shape rule: {problems[0]}")
    if recipe.backend == "tensorrt":
        with timed("lint"):
            _check_tensorrt(model, strategy, recipe, ckpt.shape.to_dict())
    counts[f"lower_moe_{strategy}"] = count
    return model, counts


def _check_tensorrt(model, strategy: str, recipe: Recipe, facts: dict[str, Any]) -> None:
    from llama4_deploy.targets.tensorrt import TargetError, check_graph

    try:
        check_graph(model, strategy, recipe.profiles.model_dump(), facts, recipe.capacity_factor)
    except TargetError as err:
        raise BuildError(str(err)) from None
