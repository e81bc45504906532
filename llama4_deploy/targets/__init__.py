"""Build targets: each backend's bundle form as an object that owns its rules (llama4_deploy/targets/base.py).

The build asks its target instead of testing a name: which attention and quantized forms `auto` means, which MoE
dispatches it can run and at what machine balance they are priced, how quantized expert stacks are laid out, which
checks every graph must pass, and what the manifest records for it. Adding a target is a new module here that
defines `TARGET`, and its name in TARGETS. This module imports nothing heavy: the CLI reads TARGETS at start-up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from llama4_deploy.targets.base import Target

TARGETS = ("onnxruntime", "tensorrt")
TargetName = Literal[TARGETS]  # the recipe's `backend` and the CLI's --target


class TargetError(ValueError):
    """A recipe, flag or graph the target cannot take; one sentence."""


def get(name: str) -> Target:
    """The target object of a name in TARGETS."""
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    return importlib.import_module(f"{__name__}.{name}").TARGET
