"""Recipes: one YAML per target, validated on load; unknown keys are rejected."""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llama4_deploy.export.shape import ConfigError, ModelShape
from llama4_deploy.graphs.forms import (AUTO, AttentionForm, BlockSize, ComputeDtype, Int4Compute, MoEDispatch,
                                        Precision, QuantForm, QuantMethod)
from llama4_deploy.targets import TargetName

REPO_ROOT = Path(__file__).resolve().parents[2]
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

    @field_validator("config")
    @classmethod
    def _known_config_keys(cls, config: dict[str, Any]) -> dict[str, Any]:
        """transformers accepts any keyword into a config; a typo would silently build its default."""
        known = llama4_text_config_keys()
        for key in config:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f" (did you mean {close[0]!r})" if close else ""
                raise ValueError(f"{key!r} is not a Llama4TextConfig field{hint}")
        return config


def llama4_text_config_keys() -> frozenset[str]:
    """Keyword arguments Llama4TextConfig takes (transformers, imported only when a recipe has a config)."""
    from transformers import Llama4TextConfig  # deferred: heavy, and `plan` reads recipes without it

    params = inspect.signature(Llama4TextConfig.__init__).parameters
    keys = {name for name, p in params.items() if name != "self" and p.kind is not p.VAR_KEYWORD}
    return frozenset(keys | set(getattr(Llama4TextConfig, "attribute_map", {})))


class Profiles(Strict):
    max_batch: Annotated[int, Field(ge=1, strict=True)] = 4
    prefill_tokens: Annotated[int, Field(ge=1, strict=True)] = 64  # most new tokens per row in one prefill step
    max_context: Annotated[int, Field(ge=2, strict=True)] = 256  # prompt + generated tokens per row


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
    # the published config.json (text model) of the model a checkpoint must be: `plan` sizes deployments from it
    published_config: dict[str, Any] | None = None
    # published facts a checkpoint must match (export/shape.py's field names); written as a list of names, the
    # values are read from published_config (one source of truth)
    expect_config: dict[str, Any] = Field(default_factory=dict)
    # precision (graphs/quantize.py): fp32/fp16/bf16 set the compute dtype; fp8/int4 quantize the linear layers
    precision: Precision = "fp32"
    compute_dtype: ComputeDtype | None = None  # None: follows the precision
    block_size: BlockSize = 128  # int4 block along the reduction axis
    quant_form: Literal[QuantForm, AUTO] = AUTO  # auto: the target's (ort, the 4-bit kernels, for int4 on ONNX Runtime)
    quant_method: QuantMethod = "rtn"  # awq: activation-aware int4 scales (export/awq.py)
    int4_compute: Int4Compute = "float"  # int8: MatMulNBits' int8 activations (graphs/quantize.py)
    calibration: str | None = None  # text lines or a JSON list of id lists; None: seeded random tokens
    backend: TargetName = "onnxruntime"  # the build target (llama4_deploy/targets/)
    moe_dispatch: Literal[MoEDispatch, AUTO] = AUTO
    # more MoE dispatches saved beside the roles' graphs, each under a role named after it, which the runtime opens
    # but never steps on (tests and benchmarks compare dispatches in one bundle)
    extra_dispatches: tuple[MoEDispatch, ...] = ()
    # attention kernel form (graphs/lower_attention.py); auto: the target's
    attention: Literal[AttentionForm, AUTO] = AUTO
    # pipeline stages: the layers split into this many graphs (llama4_deploy/build/stages.py)
    stages: Annotated[int, Field(ge=1, strict=True)] = 1
    capacity_factor: float = Field(1.25, gt=0)  # slots per expert = ceil(factor * tokens * k / experts)
    profiles: Profiles = Profiles()
    verify: Verify = Verify()

    @model_validator(mode="before")
    @classmethod
    def _expected_from_published(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("expect_config"), list):
            return data
        published = data.get("published_config")
        if not isinstance(published, dict):
            raise ValueError("expect_config is a list of names, which needs published_config to read them from")
        try:
            facts = ModelShape.from_config(published).to_dict()
        except ConfigError as err:
            raise ValueError(f"published_config: {err}") from None
        unknown = [key for key in data["expect_config"] if key not in facts]
        if unknown:
            raise ValueError(f"expect_config names {unknown[0]!r}, which is not a ModelShape field")
        expected = {key: list(facts[key]) if isinstance(facts[key], tuple) else facts[key]
                    for key in data["expect_config"]}
        return {**data, "expect_config": expected}

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
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise RecipeError(f"recipe {path.name} is a YAML {type(data).__name__}, not a mapping of keys")
        return Recipe.model_validate(data)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        problem = " ".join(str(err).split())  # YAML errors span lines
        raise RecipeError(f"recipe {path} is not valid YAML ({problem})") from None
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        if first["type"] == "extra_forbidden":
            raise RecipeError(f"recipe {path.name} has unknown key {where!r}") from None
        message = first["msg"].removeprefix("Value error, ")
        if not where:  # a check across fields (model_validator)
            raise RecipeError(f"recipe {path.name}: {message}") from None
        raise RecipeError(f"recipe {path.name}: {where}: {message}") from None
