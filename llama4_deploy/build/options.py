"""The build's options: a recipe with the build's overrides applied, validated once by the recipe's own schema.

`build()`'s keyword arguments and the CLI's flags map one to one onto recipe keys (OVERRIDES); each allowed value
is declared once, in the schema's types (llama4_deploy/build/recipe.py, graphs/forms.py, llama4_deploy/targets/),
and the CLI reads its choices from there (`choices`). The target then fixes what its backend requires
(targets/*.py, `configure`) and fills in what is still unset (`int4_defaults`: block, compute, zero point, 8-bit
projections of an int4 build), and the result is validated again by the same schema.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import ValidationError

from llama4_deploy import targets
from llama4_deploy.build.recipe import Recipe, load_recipe
from llama4_deploy.graphs.forms import values
from llama4_deploy.targets import TargetError

DEFAULT_RECIPE = "tiny"

# build() keyword argument (the CLI's flag, with dashes) -> the recipe key it overrides (dotted: nested)
OVERRIDES = {
    "moe_dispatch": "moe_dispatch",
    "attention": "attention",
    "max_context": "profiles.max_context",
    "max_batch": "profiles.max_batch",
    "prefill_tokens": "profiles.prefill_tokens",
    "precision": "precision",
    "compute_dtype": "compute_dtype",
    "block_size": "block_size",
    "quant_form": "quant_form",
    "quant_method": "quant_method",
    "int4_compute": "int4_compute",
    "int4_zero_point": "int4_zero_point",
    "int8_weights": "int8_weights",
    "calibration": "calibration",
    "stages": "stages",
    "extra_dispatches": "extra_dispatches",
    "target": "backend",
    "vision": "vision",
}
# what a value of each key is called in "unknown X 'y'; choose one of ..."
_NAMES = {
    "moe_dispatch": "MoE dispatch",
    "extra_dispatches": "MoE dispatch",
    "attention": "attention form",
    "backend": "target",
    "quant_form": "quantization form",
    "quant_method": "quantization method",
    "int4_compute": "int4 compute",
    "int4_zero_point": "int4 zero point",
    "int8_weights": "8-bit projection",
    "compute_dtype": "compute dtype",
    "block_size": "block size",
}


class BuildError(ValueError):
    """A build that cannot proceed; the message is one sentence for the user."""


def _field(key: str):
    model, *path = key.split(".")
    if path:  # profiles.max_context
        return Recipe.model_fields[model].annotation.model_fields[path[0]]
    return Recipe.model_fields[model]


# keys whose value is a tuple of choices
LISTS = ("extra_dispatches", "int8_weights")


def _element(annotation):
    """X of `tuple[X, ...]` or `tuple[X, ...] | None`."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    return _element(args[0]) if get_origin(annotation) is not tuple else args[0]


def choices(argument: str) -> list[str]:
    """The allowed values of a build() argument (as strings, for the CLI), read from the recipe's schema."""
    annotation = _field(OVERRIDES[argument]).annotation
    if argument in LISTS:
        annotation = _element(annotation)
    return [str(value) for value in values(annotation)]


def resolve(recipe: str | None, checkpoint: str | Path | None, **overrides: Any) -> Recipe:
    """The build's recipe: `recipe` (default tiny; a plain fp32 ONNX Runtime recipe when only `checkpoint` is given)
    with every not-None override applied, validated once, then fixed by its target. Raises BuildError."""
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise TypeError(f"build() got an unexpected keyword argument {unknown[0]!r}")
    given = {key: value for key, value in overrides.items() if value is not None}
    if recipe is None and checkpoint is not None:
        base = _validated(
            {
                "name": Path(checkpoint).resolve().name,  # named after the checkpoint's directory
                "description": f"fp32 ONNX Runtime build of {checkpoint}",
            },
            {},
        )
    else:
        base = load_recipe(DEFAULT_RECIPE if recipe is None else recipe)
    data = base.model_dump()
    for argument, value in given.items():
        *parents, leaf = OVERRIDES[argument].split(".")
        node = data
        for parent in parents:
            node = node[parent]
        node[leaf] = tuple(value) if argument in LISTS else str(value) if argument == "calibration" else value
    chosen = _validated(data, given)
    target = targets.get(chosen.backend)
    try:
        fixed = target.configure(chosen.model_dump(), given.get("precision"), given.get("compute_dtype"))
    except TargetError as err:
        raise BuildError(str(err)) from None
    fixed.update(target.int4_defaults({**chosen.model_dump(), **fixed}))  # what the recipe and flags left unset
    return _validated({**chosen.model_dump(), **fixed}, given) if fixed else chosen


def _validated(data: dict[str, Any], given: dict[str, Any]) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise BuildError(_sentence(err.errors()[0], given)) from None


def _sentence(error: dict[str, Any], given: dict[str, Any]) -> str:
    """One sentence for the first validation error, naming the flag that caused it."""
    loc = [part for part in error["loc"] if not isinstance(part, int)]
    key = ".".join(str(part) for part in loc)
    message = error["msg"].removeprefix("Value error, ")
    if not key:  # a check across fields
        return message
    argument = next((a for a, k in OVERRIDES.items() if k == key), key)
    if error["type"] == "literal_error":
        allowed = ", ".join(
            map(
                str,
                values(_element(_field(key).annotation) if argument in LISTS else _field(key).annotation),
            )
        )
        where = f" in {argument}" if argument in LISTS else ""
        name = _NAMES.get(loc[-1], loc[-1].replace("_", " "))
        return f"unknown {name} {error['input']!r}{where}; choose one of {allowed}"
    flag = "--" + argument.replace("_", "-") if argument in given else key
    return f"{flag} {error['input']!r}: {message[:1].lower() + message[1:]}"
