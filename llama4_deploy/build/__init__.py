"""The build pipeline: recipes and options, the steps from checkpoint to bundle (steps/), the build cache and --out.

from llama4_deploy.build import build
build(recipe="tiny", out="build/tiny", precision="int4")
"""

from __future__ import annotations

from llama4_deploy.build.options import BuildError

__all__ = ["BuildError", "BuildResult", "build"]


def __getattr__(name: str):
    # the pipeline imports torch, transformers and onnx: deferred, so the CLI and `plan` import recipes without them
    if name in ("build", "BuildResult"):
        from llama4_deploy.build import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
