"""The one object a build's steps share, and the types of the steps' results: what the build was asked for, where it
writes, and what each step produced.

The pipeline (llama4_deploy/build/pipeline.py) creates the context and calls the steps in order; a step reads the
results of the steps before it and returns its own (one of the types below), which the pipeline stores here. Reading
a result before its step ran is a bug, said as such (`require`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from llama4_deploy.build.cache import BuildCache
from llama4_deploy.build.recipe import Recipe
from llama4_deploy.build.stages import Stage
from llama4_deploy.export.checkpoint import Checkpoint
from llama4_deploy.export.shape import ModelShape
from llama4_deploy.export.vision_shape import VisionShape
from llama4_deploy.graphs.quantize import QuantSpec
from llama4_deploy.targets.base import Target


@dataclasses.dataclass(frozen=True)
class Loaded:
    checkpoint: Checkpoint
    source_dir: Path  # where its files are (the cache's directory for random weights)
    recipe: Recipe  # the build's, with the context read from the checkpoint where asked
    split: list[Stage]  # the pipeline stages' layers
    spec: QuantSpec
    # a pre-quantized checkpoint's FP8 weights: (q, scale) readers by weight name, read as the saver writes them
    stored_fp8: dict[str, Any]
    # what every later step's cache key reads: the recipe, the weights' identity, the calibration file's
    inputs: list[Any]
    vision: VisionPlan | None = None  # the vision engine to build (a multimodal checkpoint, unless --no-vision)

    @property
    def shape(self) -> ModelShape:
        return self.checkpoint.shape


@dataclasses.dataclass(frozen=True)
class VisionPlan:
    """What the vision step exports and the manifest records (export/vision.py)."""

    shape: VisionShape
    image: dict[str, Any]  # the preprocessing settings (runtime/images.py ImageSpec)
    tokens: dict[str, int]  # Llama 4's image special tokens -> ids
    max_tiles: int  # the tiles profile: images per step x (max_patches + the global tile)


@dataclasses.dataclass(frozen=True)
class Calibration:
    amax: dict[str, float] | None = None  # activation |max| by MatMul, for static fp8 activation scales
    record: dict[str, Any] | None = None  # the manifest's `calibration`
    # weight name -> a function applied to that weight as it streams (AWQ's scales); not cacheable
    rewrites: Mapping[str, Callable[[np.ndarray], np.ndarray]] | None = None


@dataclasses.dataclass(frozen=True)
class Dispatch:
    roles: dict[str, str]  # engine role (prefill, decode, exact, an extra dispatch's own) -> MoE dispatch
    passes: dict[str, int]  # pass counts of the whole model lowered with each candidate
    layouts: dict[str, str]  # dispatch -> expert weight layout where not the matmul one (gather beside native)

    @property
    def strategies(self) -> list[str]:
        return list(dict.fromkeys(self.roles.values()))

    def layout(self, strategy: str) -> str:
        return self.layouts.get(strategy, "matmul")


@dataclasses.dataclass(frozen=True)
class SavedStage:
    record: dict[str, Any]  # the manifest's record of the stage (engine.stages[i], or the unsplit engine's files)
    key: str  # its cache key
    files: dict[str, Any]  # file records (size, SHA-256) of the stage's files, by name
    passes: dict[str, int]


@dataclasses.dataclass
class BuildContext:
    recipe: Recipe  # the options, validated (llama4_deploy/build/options.py)
    target: Target
    checkpoint: Path | None  # the checkpoint directory to read; None: the recipe's seeded random weights
    context_from_checkpoint: bool  # a bare --checkpoint build: the context is the checkpoint's (capped)
    bundle: Path  # the staging directory the bundle is written into (outdir.Staging)
    cache: BuildCache  # finished steps, reused by a rerun (llama4_deploy/build/cache.py)
    log: Callable[[str], None]
    started: float  # time.time() at the start of the build
    force: bool = False  # --force: a KV cache larger than this machine's memory is built anyway (steps/load.py)
    # each step's result, in the order the steps run
    loaded: Loaded | None = None
    templates: dict[str, Any] | None = None
    calibration: Calibration | None = None
    dispatch: Dispatch | None = None
    saved: list[SavedStage] = dataclasses.field(default_factory=list)
    manifest: dict[str, Any] | None = None
    # graphs lowered and not yet saved, by (stage count, stage index, strategy, layout): the dispatch step's
    # candidates that a one-stage build saves without lowering them again (llama4_deploy/build/steps/lower.py)
    lowered: dict[tuple[int, int, str, str], Any] = dataclasses.field(default_factory=dict)

    def require(self, name: str):
        value = getattr(self, name)
        if value is None:
            raise RuntimeError(f"build step order: {name} is read before the step that produces it ran")
        return value
