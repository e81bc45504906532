"""Recipes: one YAML per target, validated on load: unknown or repeated keys are rejected, and every value is strictly
typed (no bool or string where a number is meant, no float where an integer is); a random recipe's model config is
checked as a checkpoint's config.json is (export/shape.py), before any weights are made."""

from __future__ import annotations

import difflib
import functools
import inspect
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llama4_deploy.export.shape import ConfigError, ModelShape
from llama4_deploy.graphs.forms import (
    AUTO,
    AttentionForm,
    BlockSize,
    ComputeDtype,
    Int4Compute,
    Int4ZeroPoint,
    Int8Weight,
    MoEDispatch,
    Precision,
    QuantForm,
    QuantMethod,
)
from llama4_deploy.targets import TargetName

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPE_DIR = REPO_ROOT / "recipes"


class RecipeError(ValueError):
    pass


class Strict(BaseModel):
    # strict: pydantic's lax mode reads `true` as 1 and '512' as 512, which a recipe must never mean
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class RandomWeights(Strict):
    """Seeded random weights for a Llama4TextConfig (transformers builds them, so verify can too)."""

    seed: int = Field(ge=0)
    config: dict[str, Any]
    logit_gain: float = Field(1.0, gt=0)  # scales lm_head: peaked logits, no near-ties
    router_gain: float = Field(1.0, gt=0)  # scales routers: well-separated expert choices
    # a Llama4VisionConfig: the weights are a multimodal checkpoint (export/reference.py random_multimodal), its
    # processor tiling at most max_patches tiles
    vision_config: dict[str, Any] | None = None
    max_patches: int = Field(16, ge=1)

    @field_validator("vision_config")
    @classmethod
    def _valid_vision_config(cls, config: dict[str, Any] | None) -> dict[str, Any] | None:
        if config is None:
            return None
        from llama4_deploy.export.vision_shape import VisionConfigError, VisionShape

        try:
            VisionShape.from_config({"vision_config": config, "text_config": {}})
        except VisionConfigError as err:
            raise ValueError(str(err)) from None
        return config

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

    def shape(self) -> ModelShape:
        """The model these weights have: the config over Llama4TextConfig's defaults, read as a checkpoint's
        config.json is (every size a positive integer, top-k within the experts, token ids in the vocabulary)."""
        try:
            shape = ModelShape.from_config(
                {**llama4_text_config_defaults(), **self.config, "model_type": "llama4_text"}, source="random.config"
            )
        except ConfigError as err:
            raise ValueError(str(err)) from None
        from transformers import Llama4TextConfig  # deferred: heavy, and `plan` reads recipes without it
        from transformers.utils import logging as transformers_logging

        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()  # its rope warnings are the build's to print, not every load's
        try:  # the keys ModelShape does not read are transformers' to check
            Llama4TextConfig(**self.config)
        except Exception as err:  # huggingface_hub's strict-dataclass errors span lines
            raise ValueError(f"random.config is not a valid Llama4TextConfig ({' '.join(str(err).split())})") from None
        finally:
            transformers_logging.set_verbosity(verbosity)
        return shape


@functools.cache
def _llama4_text_config_signature() -> dict[str, Any]:
    from transformers import Llama4TextConfig  # deferred: heavy, and `plan` reads recipes without it

    params = inspect.signature(Llama4TextConfig.__init__).parameters
    names = {name: p.default for name, p in params.items() if name != "self" and p.kind is not p.VAR_KEYWORD}
    return {"params": names, "aliases": tuple(getattr(Llama4TextConfig, "attribute_map", {}))}


def llama4_text_config_keys() -> frozenset[str]:
    """Keyword arguments Llama4TextConfig takes (transformers, imported only when a recipe has a config)."""
    signature = _llama4_text_config_signature()
    return frozenset(set(signature["params"]) | set(signature["aliases"]))


def llama4_text_config_defaults() -> dict[str, Any]:
    """Llama4TextConfig's defaults, for the keys a random config leaves out."""
    return {k: v for k, v in _llama4_text_config_signature()["params"].items() if v is not inspect.Parameter.empty}


class Profiles(Strict):
    max_batch: Annotated[int, Field(ge=1, strict=True)] = 4
    prefill_tokens: Annotated[int, Field(ge=1, strict=True)] = 64  # most new tokens per row in one prefill step
    max_context: Annotated[int, Field(ge=2, strict=True)] = 256  # prompt + generated tokens per row


class Verify(Strict):
    prompt_lengths: list[Annotated[int, Field(ge=1)]] | None = None  # None: derived from the chunk size (verify.py)
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
    block_size: BlockSize | None = None  # int4 block along the reduction axis; None: the target's (targets/base.py)
    quant_form: Literal[QuantForm, AUTO] = AUTO  # auto: the target's (ort, the 4-bit kernels, for int4 on ONNX Runtime)
    quant_method: QuantMethod = "rtn"  # awq: activation-aware int4 scales (export/awq.py)
    # int8: MatMulNBits' and QMoE's int8 activations (graphs/quantize.py); None: the target's (targets/base.py)
    int4_compute: Int4Compute | None = None
    # asymmetric: a zero point per block (graphs/quantize.py); None: the target's (targets/base.py)
    int4_zero_point: Int4ZeroPoint | None = None
    # projections of an int4 build kept at 8 bits (graphs/quantize.py); None: the target's (targets/base.py)
    int8_weights: tuple[Int8Weight, ...] | None = None
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
    # images (a checkpoint with a vision_config): build the vision engine (False: text only, --no-vision), how many
    # images one step encodes (the tiles profile: images x (max_patches + 1)), and whether a checkpoint's vision
    # config must be the published Scout/Maverick one (export/vision.py PUBLISHED_VISION)
    vision: bool = True
    images_per_step: Annotated[int, Field(ge=1, strict=True)] = 2
    expect_vision: bool = False

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        """The default --out is build/<name>: a name that is a path would write somewhere else."""
        if (
            not name.strip()
            or name != name.strip()
            or name.startswith((".", "-"))
            or "/" in name
            or "\\" in name
            or not name.isprintable()
            or len(name) > 128
        ):
            raise ValueError(
                "not a plain name: the default --out is build/<name>, so a name must be at most 128 printable "
                "characters with no path separator, not starting with '.' or '-'"
            )
        return name

    @field_validator("extra_dispatches", mode="before")
    @classmethod
    def _list_as_tuple(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value  # YAML has lists; strict mode takes tuples only

    @field_validator("block_size", mode="before")
    @classmethod
    def _integer_block(cls, value: Any) -> Any:
        if value is not None and type(value) is not int:  # a Literal compares by equality: 64.0, '64' pass as 64
            raise ValueError("it must be an integer: 32, 64 or 128")
        return value

    @model_validator(mode="before")
    @classmethod
    def _expected_from_published(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("expect_config"), list):
            return data
        published = data.get("published_config")
        if not isinstance(published, dict):
            raise ValueError("expect_config is a list of names, which needs published_config to read them from")
        try:
            facts = ModelShape.from_config(published, source="published_config").to_dict()
        except ConfigError as err:
            raise ValueError(str(err)) from None
        unknown = [key for key in data["expect_config"] if key not in facts]
        if unknown:
            raise ValueError(f"expect_config names {unknown[0]!r}, which is not a ModelShape field")
        expected = {
            key: list(facts[key]) if isinstance(facts[key], tuple) else facts[key] for key in data["expect_config"]
        }
        return {**data, "expect_config": expected}

    @model_validator(mode="after")
    def _one_weight_source(self) -> Recipe:
        if self.random is not None and self.checkpoint is not None:
            raise ValueError("give either random or checkpoint, not both")
        return self

    @model_validator(mode="after")
    def _random_config_is_a_model(self) -> Recipe:
        if self.random is not None:
            self.random.shape()
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


class _RepeatedKey(Exception):
    def __init__(self, key: Any, first: int, again: int):
        super().__init__(key)
        self.key, self.first, self.again = key, first, again


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node.start_mark.line)
            except TypeError:  # an unhashable key: the base constructor names it
                continue
            if first != key_node.start_mark.line:
                raise _RepeatedKey(key, first + 1, key_node.start_mark.line + 1)
        return super().construct_mapping(node, deep)


def load_recipe(name_or_path: str) -> Recipe:
    if not name_or_path.strip():
        raise RecipeError(f"--recipe is empty; give a recipe name ({', '.join(available())}) or a YAML path")
    # deferred: the runtime package loads numpy, and the CLI's start-up reads recipes without it
    from llama4_deploy.runtime.paths import kind

    path = recipe_path(name_or_path)
    found = kind(path)
    if found == "missing":
        raise RecipeError(f"no recipe {name_or_path!r}; known recipes: {', '.join(available())}")
    if found != "a file":
        raise RecipeError(f"recipe {path} is {found}, not a file")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
        if not isinstance(data, dict):
            raise RecipeError(f"recipe {path.name} is a YAML {type(data).__name__}, not a mapping of keys")
        return Recipe.model_validate(data)
    except _RepeatedKey as err:
        raise RecipeError(
            f"recipe {path.name} gives key {err.key!r} twice (lines {err.first} and {err.again}), and YAML would "
            f"silently keep the second"
        ) from None
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
        raise RecipeError(f"recipe {path.name}: {where} {_quoted(first)}: {message}") from None


def _quoted(error: dict[str, Any]) -> str:
    """The offending value, quoted as the YAML gave it, with its type where the type is the problem."""
    value = error.get("input")
    text = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    return f"{text} ({type(value).__name__})" if error["type"].endswith("_type") else text
