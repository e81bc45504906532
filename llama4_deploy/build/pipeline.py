"""The build: a checkpoint (or a recipe's seeded random weights) into a bundle directory.

`build()` validates its options once (llama4_deploy/build/options.py), takes the --out lock and a staging directory
beside --out (llama4_deploy/build/outdir.py), opens the build cache (llama4_deploy/build/cache.py), and runs the
steps in order over one BuildContext (llama4_deploy/build/steps/: load, trace, calibrate, dispatch, save per
pipeline stage, manifest, golden, hash). The bundle is renamed into place only when complete.
"""

from __future__ import annotations

import dataclasses
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llama4_deploy import targets
from llama4_deploy.build.cache import BuildCache, CacheError
from llama4_deploy.build.clock import StepClock
from llama4_deploy.build.context import BuildContext
from llama4_deploy.build.options import BuildError, resolve
from llama4_deploy.build.outdir import OutDirError, Staging, check_out
from llama4_deploy.build.steps import calibrate, dispatch, golden, hash, load, manifest, save, trace, vision
from llama4_deploy.build.steps.manifest import passes_of
from llama4_deploy.export.checkpoint import CheckpointError

__all__ = ["BuildError", "BuildResult", "build"]


@dataclasses.dataclass
class BuildResult:
    bundle: Path
    seconds: float
    peak_rss_mb: float
    passes: dict[str, int]
    manifest: dict[str, Any]
    # seconds per activity (load, trace, link, lower, quantize, lint, save, golden, hash) and when each ran
    step_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    step_spans: list[tuple[str, float, float]] = dataclasses.field(default_factory=list)  # (name, start, end)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build(
    recipe: str | None = None,
    checkpoint: str | Path | None = None,
    out: str | Path | None = None,
    log: Callable[[str], None] = _stderr,
    force: bool = False,
    **overrides: Any,
) -> BuildResult:
    """Build a bundle. `recipe` names a recipe (default tiny, or a plain fp32 ONNX Runtime build when only
    `checkpoint` is given) or a YAML path; `checkpoint` is a Hugging Face checkpoint directory (default: the recipe's
    own, or its seeded random weights). `out` (default build/<recipe>) may hold only a bundle this tool wrote, or
    nothing, unless `force` (outdir.py); `force` also builds a KV cache larger than this machine's memory
    (steps/load.py). `overrides` replace recipe keys, one per CLI flag (options.OVERRIDES): moe_dispatch, attention,
    max_context, max_batch, prefill_tokens, precision, compute_dtype, block_size, quant_form, quant_method,
    int4_compute, int4_zero_point, int8_weights, calibration, stages, extra_dispatches, target; None keeps the recipe's.
    A bare checkpoint's context defaults to its max_position_embeddings, at most load.DEFAULT_MAX_CONTEXT."""
    started = time.time()
    for flag, value in (
        ("--recipe", recipe),
        ("--checkpoint", checkpoint),
        ("--out", out),
        ("--calibration", overrides.get("calibration")),
    ):
        if isinstance(value, str) and not value.strip():  # "" would otherwise mean the default, or the current dir
            raise BuildError(f"{flag} is empty; give a value or leave the option out for its default")
    bare_checkpoint = recipe is None and checkpoint is not None
    chosen = resolve(recipe, checkpoint, **overrides)
    out = Path(out or Path("build") / chosen.name).resolve()
    if checkpoint is None and chosen.checkpoint_path is not None:
        checkpoint = chosen.checkpoint_path  # shipped with the repository (recipes/tiny-trained.yaml)
    if checkpoint is None and chosen.random is None:
        raise BuildError(
            f"recipe {chosen.name} needs a checkpoint: run make engine MODEL={chosen.name} CHECKPOINT=/path "
            f"(or llama4-deploy build --recipe {chosen.name} --checkpoint DIR)"
        )
    clock = StepClock()
    try:
        check_out(out, force, None if checkpoint is None else Path(checkpoint))
        with Staging(out) as staging, clock.running():
            if staging.removed_stale:
                log(
                    f"[out] removed {len(staging.removed_stale)} staging dir(s) of killed builds: "
                    f"{', '.join(staging.removed_stale)}"
                )
            cache = BuildCache(out, log).open()  # resumable steps, under the lock
            resumable = True  # an interrupt or a crash keeps the finished steps for a rerun
            try:
                ctx = BuildContext(
                    recipe=chosen,
                    target=targets.get(chosen.backend),
                    checkpoint=None if checkpoint is None else Path(checkpoint),
                    context_from_checkpoint=bare_checkpoint and overrides.get("max_context") is None,
                    bundle=staging.dir,
                    cache=cache,
                    log=log,
                    started=started,
                    force=force,
                )
                run_steps(ctx)
                staging.commit()
                resumable = False
            except (ValueError, TypeError):  # bad input (one sentence): nothing is left on disk
                resumable = False
                raise
            finally:
                cache.close(keep=resumable)
    except (OutDirError, CacheError) as err:
        raise BuildError(str(err)) from None
    log(f"[steps] {', '.join(f'{k} {v:.1f}s' for k, v in clock.seconds.items())}")
    return BuildResult(
        out, time.time() - started, _peak_rss_mb(), passes_of(ctx), ctx.manifest, dict(clock.seconds), list(clock.spans)
    )


def run_steps(ctx: BuildContext) -> None:
    """The steps, in order; each one's result goes into the context for the ones after it."""
    try:
        ctx.loaded = load.run(ctx)
        ctx.templates = trace.run(ctx)
        ctx.calibration = calibrate.run(ctx)
        ctx.dispatch = dispatch.run(ctx)
        for stage in ctx.loaded.split:
            ctx.saved.append(save.run(ctx, stage))
        vision.run(ctx)
    except CheckpointError as err:  # a tensor that fails to read while streaming
        raise BuildError(str(err)) from None
    ctx.log(f"[passes] {passes_of(ctx)}")
    ctx.manifest = manifest.run(ctx)
    golden.run(ctx)
    ctx.manifest = hash.run(ctx)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
