"""Step `vision`: a multimodal checkpoint's vision tower and projector exported as the bundle's vision engine
(export/vision.py: `vision.onnx`, weights in `vision.onnx.data`, float32 at every precision), linted like the text
graphs (the static-shape lint; for the tensorrt target also its parser lint), and checked on ONNX Runtime against
the deploy-form module it was exported from; kept in the build cache."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from llama4_deploy.build.cache import step_key
from llama4_deploy.build.clock import timed
from llama4_deploy.build.context import BuildContext
from llama4_deploy.build.options import BuildError
from llama4_deploy.export.vision import DeployVision, VisionConfigError, export_vision, read_vision_weights
from llama4_deploy.graphs.lint import lint_static
from llama4_deploy.graphs.lint_tensorrt import lint_tensorrt

GRAPH = "vision.onnx"
# export vs its own module on random tiles: the same fp32 ops, reassociated by ONNX Runtime's kernels
EXPORT_TOLERANCE = 1e-4


def run(ctx: BuildContext) -> dict[str, Any] | None:
    loaded = ctx.require("loaded")
    plan = loaded.vision
    if plan is None:
        return None
    key = step_key("vision", loaded.inputs, plan.max_tiles)
    hit = ctx.cache.get("vision", key)
    if hit is None:
        ctx.log(f"[vision] exporting the vision tower and projector (tiles 1..{plan.max_tiles})")
        with ctx.cache.put("vision", key) as (directory, record), timed("vision"):
            try:
                module = DeployVision(plan.shape).load(read_vision_weights(loaded.checkpoint, plan.shape))
            except VisionConfigError as err:
                raise BuildError(f"{err} (--no-vision builds the text model only)") from None
            export_vision(module, directory / GRAPH)
            graph = ir.load(directory / GRAPH)
            problems = lint_static(graph)
            if problems:
                raise BuildError(f"the vision graph breaks the static-shape rule: {problems[0]}")
            if ctx.target.name == "tensorrt":  # what TensorRT's ONNX parser documents, as for the text graphs
                problems = lint_tensorrt(graph)
                if problems:
                    raise BuildError(f"the vision graph breaks the TensorRT parser lint: {problems[0]}")
                record["tensorrt_lint"] = "pass"
            record["export_error"] = _check_export(module, directory / GRAPH, plan)
    else:
        record = hit[1]
    ctx.cache.link_files("vision", key, ctx.bundle)
    return record


def _check_export(module: DeployVision, path, plan) -> float:
    """The exported graph on ONNX Runtime against the module, at 1 tile and at the profile's limit."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    side, worst = plan.shape.image_size, 0.0
    generator = torch.Generator().manual_seed(0)
    for tiles in sorted({1, plan.max_tiles}):
        pixels = torch.rand(tiles, plan.shape.num_channels, side, side, generator=generator) * 2 - 1
        with torch.no_grad():
            want = module(pixels).numpy()
        got = session.run(None, {"pixel_values": pixels.numpy()})[0]
        worst = max(worst, float(np.abs(got - want).max()))
    if not worst <= EXPORT_TOLERANCE:
        raise BuildError(f"the exported vision graph differs from its module by {worst:.3g} (> {EXPORT_TOLERANCE})")
    return worst
