"""Step `manifest`: the bundle's manifest.json (docs/engine-abi.md) from the steps' results, with the tokenizer files
copied in; written without file hashes, so the golden step can load the bundle, then again by the hash step."""

from __future__ import annotations

import shutil
import time
from typing import Any

import onnx
import onnxruntime
import torch
import transformers

from llama4_deploy.build.context import BuildContext
from llama4_deploy.runtime import abi
from llama4_deploy.runtime.bundle import GOLDEN, write_manifest


def run(ctx: BuildContext) -> dict[str, Any]:
    loaded, calibration, chosen = ctx.require("loaded"), ctx.require("calibration"), ctx.require("dispatch")
    recipe, shape, spec, checkpoint = loaded.recipe, loaded.shape, loaded.spec, loaded.checkpoint
    if checkpoint.tokenizer_file is not None:
        shutil.copyfile(checkpoint.tokenizer_file, ctx.bundle / "tokenizer.json")
    if checkpoint.tokenizer_config_file is not None:  # the chat template `serve` renders
        shutil.copyfile(checkpoint.tokenizer_config_file, ctx.bundle / "tokenizer_config.json")
    stages = [saved.record for saved in ctx.saved]
    layers = [
        {
            "index": i,
            "attention": "chunked" if kind.rope else "global",
            "cache_slots": shape.attention_chunk_size if kind.rope else None,
            "moe": kind.moe,
        }
        for i, kind in enumerate(shape.layer_kinds)
    ]
    graphs = {}
    for role, strategy in chosen.roles.items():
        graphs[role] = {
            "moe_dispatch": strategy,
            "attention": ctx.target.attention_form(recipe.attention),
            "reports_overflow": any(stage["graphs"][role]["reports_overflow"] for stage in stages),
        }
        if strategy == "capacity":
            graphs[role]["capacity_factor"] = recipe.capacity_factor
    inputs, outputs = abi.stage_io(
        range(shape.num_layers), first=True, last=True, overflow=any(g["reports_overflow"] for g in graphs.values())
    )
    engine = {
        "backend": recipe.backend,
        "precision": spec.precision,
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
    passes = passes_of(ctx)
    manifest = {
        "name": recipe.name,
        "model": shape.to_dict(),
        "layers": layers,
        "engine": engine,
        "profiles": recipe.profiles.model_dump(),
        "tokenizer": "tokenizer.json" if checkpoint.tokenizer_file is not None else None,
        "tokenizer_config": "tokenizer_config.json" if checkpoint.tokenizer_config_file is not None else None,
        "source": (
            {"kind": "checkpoint", "path": str(checkpoint.path)}
            if ctx.checkpoint is not None
            else {"kind": "random", "recipe": recipe.name, "random": recipe.random.model_dump()}
        ),
        "verify": recipe.verify.model_dump(),
        "golden": GOLDEN,
        "build": {
            "recipe": recipe.name,
            "moe_dispatch": recipe.moe_dispatch,
            "stages": len(stages),
            "passes": passes,
            "seconds": round(time.time() - ctx.started, 1),
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
            },
        },
    }
    engine["precision"] = spec.precision
    engine["compute_dtype"] = spec.compute_dtype
    engine["quant_form"] = spec.form if spec.quantized else None
    engine["quantization"] = spec.model_dump(mode="json")
    engine["cache_dtype"] = engine["logits_dtype"] = spec.compute_dtype
    manifest["calibration"] = calibration.record
    if spec.compute_dtype == "bfloat16":
        manifest["golden"] = None
    if loaded.vision is not None:
        engine["vision"] = vision_record(loaded.vision, stages[0]["embeddings"])
    record = ctx.target.manifest_record(
        stages, recipe.profiles.model_dump(), manifest["model"], manifest["layers"], engine.get("vision")
    )
    if record is not None:
        engine[ctx.target.name] = record
    manifest["files"] = {}
    write_manifest(ctx.bundle, manifest)
    return manifest


def passes_of(ctx: BuildContext) -> dict[str, int]:
    """The build's pass counts, summed over stages."""
    passes: dict[str, int] = {}
    for saved in ctx.saved:
        for name, count in saved.passes.items():
            passes[name] = passes.get(name, 0) + count
    return passes


def vision_record(plan, embeddings: dict[str, str]) -> dict[str, Any]:
    """The manifest's `engine.vision`: the vision graph and its profile, the preprocessing, the image tokens, and
    the embedding step (docs/engine-abi.md, "Images")."""
    shape = plan.shape
    return {
        "file": "vision.onnx",
        "external_data": "vision.onnx.data",
        "input": "pixel_values",  # [tiles, channels, image_size, image_size] float32
        "output": "image_features",  # [tiles, tokens_per_tile, hidden] float32
        "max_tiles": plan.max_tiles,
        "tokens_per_tile": shape.tokens_per_tile,
        "dtype": "float32",  # unquantized at every precision (export/vision.py)
        "config": {
            "hidden_size": shape.hidden_size,
            "num_layers": shape.num_layers,
            "num_heads": shape.num_heads,
            "intermediate_size": shape.intermediate_size,
            "projector_output": shape.text_hidden_size,
            "num_channels": shape.num_channels,
        },
        "image": plan.image,
        "tokens": plan.tokens,
        "embed": embeddings["embed"],
        "prefill": embeddings["prefill"],
        "exact": embeddings.get("exact"),  # the capacity dispatch's overflow rerun, when the prefill graph has one
    }
