"""What a build target decides, with the ONNX Runtime answers as defaults (targets/onnxruntime.py takes them all)."""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

from llama4_deploy.graphs.dispatch import DispatchRules
from llama4_deploy.graphs.forms import AUTO, INT4_DEFAULTS, AttentionForm, QuantForm
from llama4_deploy.graphs.quantize import QuantSpec, form_for
from llama4_deploy.targets import TargetError

Json = dict[str, Any]  # a manifest record, a recipe's keys, the model's facts


class Target:
    """A backend's bundle form. Subclasses set the class attributes and override what differs."""

    name: str
    dispatch: DispatchRules  # MoE dispatches the backend runs, and the machine balance they are priced at
    attention_auto: AttentionForm  # the attention form `auto` means
    int4_form: QuantForm  # the quantized form `auto` means for int4
    per_expert_weights: bool = False  # quantized expert stacks as per-expert 2-D constants (lower_quant_qdq.py)

    def configure(self, recipe: Json, precision: str | None, compute_dtype: str | None) -> Json:
        """Recipe keys the target fixes, given the recipe (with the build's overrides) and the precision flags the
        user passed (None: not passed). Raises TargetError on a choice the backend cannot run."""
        return {}

    def int4_defaults(self, recipe: Json) -> Json:
        """The int4 keys a recipe leaves unset (None: block size, int4 compute, zero point, 8-bit projections), given
        the recipe the target has fixed: the defaults of the int4 form the build takes on this target
        (graphs/forms.py INT4_DEFAULTS: the ort form's fast and close ones; qdq's TensorRT contract). int8
        activations and zero points are the ort form's kernels', and on the experts QMoE's alone, so a pinned MoE
        dispatch other than native keeps float activations and symmetric blocks; a build that is not int4 in the
        ort form takes neither, nor 8-bit projections."""
        form = form_for(recipe["precision"], recipe["quant_form"], self.int4_form)
        default = INT4_DEFAULTS[form]
        compute, zero_point, int8_weights = default.int4_compute, default.int4_zero_point, default.int8_weights
        dispatches = {recipe["moe_dispatch"], *recipe["extra_dispatches"]}
        if recipe["precision"] != "int4" or form != "ort" or dispatches - {AUTO, "native"}:
            compute, zero_point = "float", "symmetric"
        if recipe["precision"] != "int4" or form != "ort":
            int8_weights = ()
        chosen = {
            "block_size": default.block_size,
            "int4_compute": compute,
            "int4_zero_point": zero_point,
            "int8_weights": int8_weights,
        }
        return {key: value for key, value in chosen.items() if recipe[key] is None}

    def attention_form(self, choice: str) -> AttentionForm:
        return self.attention_auto if choice == AUTO else choice

    def dispatch_refusals(self, spec: QuantSpec) -> dict[str, str]:
        """MoE dispatches this spec cannot run on the backend, each with its one-sentence reason."""
        return spec.dispatch_refusals()

    def roles(self, requested: str, chosen: dict[str, str]) -> dict[str, str]:
        """The engine roles' dispatches, given the cost model's choice (graphs/dispatch.py, `choose`)."""
        return chosen

    def lint(self, model: ir.Model, profiles: dict[str, int], facts: Json, capacity_factor: float) -> list[str]:
        """Problems the backend's parser would find in a graph, beyond the static-shape lint every target runs."""
        return []

    def check_graph(
        self, model: ir.Model, strategy: str, profiles: dict[str, int], facts: Json, capacity_factor: float
    ) -> None:
        """Raise TargetError (one sentence, the first problem) if the backend would refuse the graph."""
        problems = self.lint(model, profiles, facts, capacity_factor)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise TargetError(f"the {strategy} graph is not one {self.parser} can parse: {problems[0]}{more}")

    parser = "the backend"  # names what refuses a graph, in check_graph's sentence

    def manifest_record(
        self, stages: list[Json], profiles: dict[str, int], model: Json, layers: list[Json], vision: Json | None = None
    ) -> Json | None:
        """What the manifest records under `engine.<name>` (None: nothing); `vision`: the manifest's engine.vision,
        if the bundle has a vision engine."""
        return None
