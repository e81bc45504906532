"""What every graph pass shares, on onnx-ir's pass infrastructure (`onnx_ir.passes`): a rewrite pass reports how
many places it changed; a pipeline runs passes in order and collects `{pass name: count}`, the table the build
prints and the manifest records; a pass that cannot rewrite a node it should have raises LoweringError.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence

import onnx_ir as ir


class LoweringError(ValueError):
    """A pass met a node or weight it should have rewritten and cannot; the message is one sentence naming it and
    the reason, e.g. "MoE node /layers.1/node_moe was not lowered to native: it has top_k 2; ..."."""


@dataclasses.dataclass
class RewriteResult(ir.passes.PassResult):
    count: int = 0  # places the pass changed (nodes replaced, weights quantized, values re-typed)


@dataclasses.dataclass
class PipelineResult(ir.passes.PassResult):
    counts: dict[str, int] = dataclasses.field(default_factory=dict)  # {pass name: count}, in the order run


class RewritePass(ir.passes.InPlacePass):
    """An in-place pass that counts what it changed. `name` is its entry in the pass table (`lower_moe_native`,
    `quantize_qdq`, ...); `rewrite(model)` changes the model and returns the count."""

    name: str

    @abc.abstractmethod
    def rewrite(self, model: ir.Model) -> int: ...

    def call(self, model: ir.Model) -> RewriteResult:
        count = self.rewrite(model)
        return RewriteResult(model, modified=count > 0, count=count)


class FormPass(RewritePass):
    """A pass that rewrites a graph into one of several forms, and is named after the one it was given
    (`lower_attention_onnx23`, `compute_dtype_float16`)."""

    forms: tuple[str, ...]  # the forms it can produce
    family: str  # its name before the form
    what: str  # what a form is called, for the refusal of an unknown one

    def __init__(self, form: str):
        if form not in self.forms:
            raise ValueError(f"unknown {self.what} {form!r}; expected one of {', '.join(self.forms)}")
        self.form = form

    @property
    def name(self) -> str:
        return f"{self.family}_{self.form}"


class PassPipeline(ir.passes.PassManager):
    """Run passes once each, in order, and collect `{pass name: count}` (a nested pipeline's counts are merged in;
    a pass that does not count is run and left out of the table). A pass's error reaches the caller as raised:
    PassManager's own `call` would wrap it in two PassErrors, burying the one sentence."""

    def __init__(self, passes: Sequence[ir.passes.PassBase]):
        super().__init__(passes, steps=1, early_stop=False)

    def call(self, model: ir.Model) -> PipelineResult:
        counts: dict[str, int] = {}
        modified = False
        for pass_ in self.passes:
            result = pass_(model)
            if isinstance(result, PipelineResult):
                counts.update(result.counts)
            elif isinstance(result, RewriteResult):
                counts[pass_.name] = result.count
            modified |= result.modified
        return PipelineResult(model, modified=modified, counts=counts)


def run_passes(model: ir.Model, passes: Sequence[ir.passes.PassBase]) -> dict[str, int]:
    """Run `passes` on `model` in place; returns `{pass name: count}` (empty for no passes)."""
    return PassPipeline(passes)(model).counts if passes else {}
