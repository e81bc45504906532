"""Recipes: one YAML per target, validated on load; unknown keys are rejected."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE_DIR = REPO_ROOT / "recipes"


class RecipeError(ValueError):
    pass


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RandomWeights(Strict):
    """Seeded random weights for a Llama4TextConfig (transformers builds them, so verify can too)."""

    seed: int
    config: dict[str, Any]
    logit_gain: float = Field(1.0, gt=0)  # scales lm_head: peaked logits, no near-ties
    router_gain: float = Field(1.0, gt=0)  # scales routers: well-separated expert choices


class Profiles(Strict):
    max_batch: int = Field(4, ge=1)
    prefill_tokens: int = Field(64, ge=1)  # most new tokens per row in one prefill step
    max_context: int = Field(256, ge=2)  # prompt + generated tokens per row


class Verify(Strict):
    prompt_lengths: list[int] | None = None  # None: derived from the chunk size (verify.py)
    new_tokens: int = Field(32, ge=1)


class Recipe(Strict):
    name: str
    description: str
    needs: str = "nothing: random weights, any machine"  # checkpoint, GPUs, memory
    random: RandomWeights | None = None
    checkpoint: str | None = None  # a checkpoint shipped in the repository, relative to its root
    checkpoint_required: bool = False
    expect_config: dict[str, Any] = Field(default_factory=dict)  # published facts a checkpoint must match
    precision: Literal["fp32"] = "fp32"
    backend: Literal["onnxruntime"] = "onnxruntime"
    moe_dispatch: Literal["dense", "gather", "capacity", "native", "auto"] = "auto"
    # attention kernel form (graphs/lower_attention.py); auto: onnx23 for ONNX Runtime, decomposed otherwise
    attention: Literal["decomposed", "onnx23", "auto"] = "auto"
    capacity_factor: float = Field(1.25, gt=0)  # slots per expert = ceil(factor * tokens * k / experts)
    profiles: Profiles = Profiles()
    verify: Verify = Verify()

    @model_validator(mode="after")
    def _one_weight_source(self) -> "Recipe":
        if self.random is not None and self.checkpoint is not None:
            raise ValueError("give either random or checkpoint, not both")
        return self

    @property
    def checkpoint_path(self) -> Path | None:
        return REPO_ROOT / self.checkpoint if self.checkpoint is not None else None


def recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        return path
    return RECIPE_DIR / f"{name_or_path}.yaml"


def available() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str) -> Recipe:
    path = recipe_path(name_or_path)
    if not path.is_file():
        raise RecipeError(f"no recipe {name_or_path!r}; known recipes: {', '.join(available())}")
    try:
        data = yaml.safe_load(path.read_text())
        return Recipe.model_validate(data)
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {path} is not valid YAML ({err})") from None
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        if first["type"] == "extra_forbidden":
            raise RecipeError(f"recipe {path.name} has unknown key {where!r}") from None
        if not where:  # a check across fields (model_validator)
            raise RecipeError(f"recipe {path.name}: {first['msg'].removeprefix('Value error, ')}") from None
        raise RecipeError(f"recipe {path.name}: {where}: {first['msg']}") from None
