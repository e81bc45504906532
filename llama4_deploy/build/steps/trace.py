"""Step `trace`: each layer kind of the deploy-form model traced once into an ONNX template (export/trace.py), with
the embedding, the head and the prologue of every pipeline stage; kept in the build cache."""

from __future__ import annotations

import time
from typing import Any

from llama4_deploy.build.cache import step_key
from llama4_deploy.build.clock import timed
from llama4_deploy.build.context import BuildContext
from llama4_deploy.build.stage_graphs import stage_prologue
from llama4_deploy.export.trace import load_templates, save_templates, trace_templates


def run(ctx: BuildContext) -> dict[str, Any]:
    loaded = ctx.require("loaded")
    shape, cache, log = loaded.shape, ctx.cache, ctx.log
    prologues = tuple(dict.fromkeys(stage_prologue(shape, stage) for stage in loaded.split))
    key = step_key("trace", shape.to_dict(), prologues)
    hit = cache.get("trace", key)
    if hit is not None:
        return load_templates(hit[0], hit[1]["templates"])
    kinds = sorted({k.name for k in shape.layer_kinds})
    started = time.time()
    log(f"[trace] embed, head and {len(kinds)} layer kinds: {', '.join(kinds)}")
    with timed("trace"):
        templates = trace_templates(shape, prologues)
    log(f"[trace] done in {time.time() - started:.1f}s")
    with cache.put("trace", key) as (directory, record):
        save_templates(templates, directory)
        record["templates"] = list(templates)
    return templates
