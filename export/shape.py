"""The model's shape: one dataclass built from a checkpoint's config.json.

Every size the pipeline uses is read here, from the config, and nowhere else. Derived
fields (layer kinds, MoE placement, RoPE frequencies) are computed in one place.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

SUPPORTED_ROPE_TYPES = ("default", "llama3")


class ConfigError(ValueError):
    """A config.json that is not a Llama 4 text model this pipeline can build."""


# a multimodal config's image tokens (Llama4Config's names and their *_id aliases), ids of the text vocabulary
IMAGE_TOKEN_KEYS = (
    "image_token_index",
    "boi_token_index",
    "eoi_token_index",
    "image_token_id",
    "boi_token_id",
    "eoi_token_id",
)
_REQUIRED = object()
# ModelShape's sizes and the config.json keys they are read from
CONFIG_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "intermediate_size_mlp": "intermediate_size_mlp",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "num_experts": "num_local_experts",
    "top_k": "num_experts_per_tok",
    "attention_chunk_size": "attention_chunk_size",
    "max_position_embeddings": "max_position_embeddings",
}


def check_relations(sizes: dict[str, int], source: str, names: dict[str, str]) -> None:
    """What the sizes (ModelShape's names; `names` maps them to the caller's) must satisfy together: the query
    heads grouped evenly over the KV heads, an even head width (RoPE rotates pairs), top-k within the experts."""
    heads, kv_heads, head_dim = sizes["num_heads"], sizes["num_kv_heads"], sizes["head_dim"]
    if heads % kv_heads:
        raise ConfigError(
            f"{source} has {names['num_heads']} {heads}, not a multiple of {names['num_kv_heads']} {kv_heads}"
        )
    if head_dim % 2:
        raise ConfigError(f"{source} has {names['head_dim']} {head_dim}, which is odd; RoPE rotates pairs")
    if sizes["top_k"] > sizes["num_experts"]:
        raise ConfigError(
            f"{source} has {names['top_k']} {sizes['top_k']}, more than its {names['num_experts']} "
            f"{sizes['num_experts']}; a token picks its experts among them"
        )


def _kind(value: Any) -> str:
    """What a wrongly typed value is, for a sentence that quotes it."""
    return {bool: " (a boolean)", str: " (a string)"}.get(type(value), "")


class ConfigReader:
    """Typed reads of a config's values: each refuses, in one sentence naming the field, a value of the wrong type
    (no bool or string for a number, no float for an integer) or out of range. Sizes are positive integers."""

    def __init__(self, config: dict[str, Any], source: str, lacks: str = "which a Llama 4 text config must have"):
        self.config, self.source, self.lacks = config, source, lacks

    def _refuse(self, key: str, value: Any, must: str) -> ConfigError:
        return ConfigError(f"{self.source} has {key} {value!r}{_kind(value)}; it must be {must}")

    def _value(self, key: str, default: Any) -> Any:
        value = self.config.get(key)
        if value is None:
            if default is _REQUIRED:
                raise ConfigError(f"{self.source} lacks {key!r}, {self.lacks}")
            return default
        return value

    def integer(self, key: str, default: Any = _REQUIRED) -> int:
        value = self._value(key, default)
        if type(value) is not int or value < 1:
            raise self._refuse(key, value, "a positive integer")
        return value

    def positive(self, key: str, value: Any = _REQUIRED) -> float:
        value = self._value(key, _REQUIRED) if value is _REQUIRED else value
        if not _is_number(value) or not math.isfinite(value) or value <= 0:
            raise self._refuse(key, value, "a positive number")
        return float(value)

    def finite(self, key: str, value: Any) -> float:
        if not _is_number(value) or not math.isfinite(value):
            raise self._refuse(key, value, "a finite number")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self._value(key, default)
        if type(value) is not bool:
            raise self._refuse(key, value, "true or false")
        return value

    def layer_list(self, key: str, num_layers: int) -> list[int] | None:
        """A list of distinct layer indices in [0, num_layers), or None where the config gives none."""
        value = self.config.get(key)
        if value is None:
            return None
        if not (isinstance(value, list) and all(type(i) is int for i in value)) or len(set(value)) != len(value):
            raise self._refuse(key, value, "a list of distinct layer indices")
        outside = [i for i in value if not 0 <= i < num_layers]
        if outside:
            raise ConfigError(
                f"{self.source} has {key} naming layer {outside[0]}, but num_hidden_layers is {num_layers} "
                f"(layers 0-{num_layers - 1})"
            )
        return value

    def flags(self, key: str) -> list[int] | None:
        """A list of 0/1 flags per layer (booleans taken as such), or None where the config gives none."""
        value = self.config.get(key)
        if not value:
            return None
        if not (isinstance(value, list) and all(v in (0, 1) and type(v) in (int, bool) for v in value)):
            raise self._refuse(key, value, "a list of 0 or 1 per layer")
        return [int(v) for v in value]

    def token_id(self, key: str, vocab_size: int) -> int | None:
        value = self.config.get(key)
        if value is None:
            return None
        if type(value) is not int or not 0 <= value < vocab_size:
            raise self._refuse(key, value, f"a token id inside the vocabulary [0, {vocab_size})")
        return value

    def token_ids(self, key: str, vocab_size: int) -> tuple[int, ...]:
        """One token id or a list of them (eos_token_id), as a tuple; () where the config gives none."""
        value = self.config.get(key)
        if value is None:
            return ()
        if not isinstance(value, list):
            return (self.token_id(key, vocab_size),)
        ids = value
        bad = [i for i in ids if type(i) is not int or not 0 <= i < vocab_size]
        if bad:
            raise ConfigError(
                f"{self.source} has {key} {value!r}, whose {bad[0]!r}{_kind(bad[0])} is not a token id inside the "
                f"vocabulary [0, {vocab_size})"
            )
        return tuple(ids)


def _is_number(value: Any) -> bool:
    return type(value) in (int, float)


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """One of at most four Llama 4 layer kinds; each is traced once."""

    rope: bool  # RoPE + chunked attention (True) or NoPE + global attention (False)
    moe: bool  # routed experts + shared expert (True) or dense SwiGLU MLP (False)

    @property
    def name(self) -> str:
        return f"{'rope_chunked' if self.rope else 'nope_global'}_{'moe' if self.moe else 'dense'}"


@dataclasses.dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # per expert and shared expert
    intermediate_size_mlp: int  # dense layers
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    moe_layers: tuple[int, ...]
    rope_layers: tuple[bool, ...]  # no_rope_layers[i] == 1 means layer i uses RoPE
    attention_chunk_size: int
    use_qk_norm: bool
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # llama3 parameters, None for plain RoPE
    attn_temperature_tuning: bool
    attn_scale: float
    floor_scale: float
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    tie_word_embeddings: bool

    @property
    def layer_kinds(self) -> tuple[LayerKind, ...]:
        return tuple(LayerKind(rope=self.rope_layers[i], moe=i in self.moe_layers) for i in range(self.num_layers))

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelShape:
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in fields}
        for key in ("moe_layers", "rope_layers", "eos_token_ids"):
            kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)

    @classmethod
    def from_facts(cls, facts: dict[str, Any], source: str) -> ModelShape:
        """A bundle manifest's `model` record (`to_dict`'s fields) read back with the checks `from_config` makes of
        the sizes, which name the record's fields (`source` names the manifest)."""
        names = {field: f"model.{field}" for field in CONFIG_KEYS}
        read = ConfigReader({names[f]: facts.get(f) for f in CONFIG_KEYS}, source, lacks="which a bundle records")
        sizes = {field: read.integer(name) for field, name in names.items()}
        check_relations(sizes, source, names)
        try:
            return cls.from_dict(facts)
        except (TypeError, KeyError) as err:
            raise ConfigError(f"{source}: model is not a model record this tool writes ({err})") from None

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str = "config.json") -> ModelShape:
        """Build from a config.json dict (model_type llama4_text, or llama4 with a text_config), every value checked
        (`ConfigReader`): a size that is not a positive integer, a relation between sizes the model cannot have, or
        a token id outside the vocabulary is refused in one sentence naming the field, before any work. `source`
        names the config in those sentences ("config.json", or a recipe's "random.config")."""
        model_type = config.get("model_type")
        outer = None
        if model_type == "llama4":
            if not isinstance(config.get("text_config"), dict):
                raise ConfigError(f"{source} has model_type 'llama4' but no text_config")
            outer, config = config, config["text_config"]
            model_type = config.get("model_type", "llama4_text")
        if model_type != "llama4_text":
            raise ConfigError(
                f"{source} has model_type {model_type!r}; expected 'llama4_text' or 'llama4' (a Llama 4 checkpoint)"
            )
        read = ConfigReader(config, source)
        num_layers = read.integer("num_hidden_layers")
        hidden = read.integer("hidden_size")
        num_heads = read.integer("num_attention_heads")
        num_kv_heads = read.integer("num_key_value_heads", default=num_heads)
        if config.get("head_dim") is None and hidden % num_heads:
            raise ConfigError(
                f"{source} has hidden_size {hidden}, not a multiple of num_attention_heads {num_heads}, and no "
                f"head_dim to say how wide a head is"
            )
        head_dim = read.integer("head_dim", default=hidden // num_heads)
        num_experts = read.integer("num_local_experts")
        top_k = read.integer("num_experts_per_tok", default=1)
        check_relations(
            {
                "num_heads": num_heads,
                "num_kv_heads": num_kv_heads,
                "head_dim": head_dim,
                "num_experts": num_experts,
                "top_k": top_k,
            },
            source,
            CONFIG_KEYS,
        )
        intermediate = read.integer("intermediate_size")
        vocab = read.integer("vocab_size")

        step = read.integer("interleave_moe_layer_step", default=1)
        moe_layers = read.layer_list("moe_layers", num_layers)
        if moe_layers is None:
            moe_layers = list(range(step - 1, num_layers, step))
        interval = read.integer("no_rope_layer_interval", default=4)
        no_rope_layers = read.flags("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(num_layers)]
        if len(no_rope_layers) < num_layers:
            raise ConfigError(f"{source} has no_rope_layers of {len(no_rope_layers)} entries for {num_layers} layers")

        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"{source} has rope_parameters {rope!r}; it must be an object")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"{source}: rope_type {rope_type!r} is not supported; Llama 4 uses {SUPPORTED_ROPE_TYPES}"
            )
        theta = read.positive("rope_theta", rope.get("rope_theta", config.get("rope_theta", 500000.0)))
        scaling = None
        if rope_type == "llama3":
            rope_read = ConfigReader(rope, f"{source}'s rope_parameters", lacks="which llama3 scaling needs")
            scaling = {
                "factor": rope_read.positive("factor"),
                "low_freq_factor": rope_read.positive("low_freq_factor"),
                "high_freq_factor": rope_read.positive("high_freq_factor"),
                "original_max_position_embeddings": rope_read.integer("original_max_position_embeddings"),
            }

        if config.get("attention_chunk_size") is None:
            raise ConfigError(f"{source} has attention_chunk_size null; Llama 4's RoPE layers need a chunk size")
        chunk = read.integer("attention_chunk_size")
        if read.boolean("attention_bias", False):
            raise ConfigError(f"{source} has attention_bias true; Llama 4 attention has no bias")
        if config.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source} has hidden_act {config.get('hidden_act')!r}; Llama 4 uses 'silu'")

        bos = read.token_id("bos_token_id", vocab)
        eos = read.token_ids("eos_token_id", vocab)
        read.token_id("pad_token_id", vocab)
        if outer is not None:  # the image tokens of a multimodal config index the text model's vocabulary
            for key in IMAGE_TOKEN_KEYS:
                ConfigReader(outer, source).token_id(key, vocab)
        return cls(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            intermediate_size_mlp=read.integer("intermediate_size_mlp", default=intermediate),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            num_experts=num_experts,
            top_k=top_k,
            moe_layers=tuple(moe_layers),
            rope_layers=tuple(bool(v) for v in no_rope_layers[:num_layers]),
            attention_chunk_size=chunk,
            use_qk_norm=read.boolean("use_qk_norm", True),
            rms_norm_eps=read.positive("rms_norm_eps", config.get("rms_norm_eps", 1e-5)),
            rope_theta=theta,
            rope_scaling=scaling,
            attn_temperature_tuning=read.boolean("attn_temperature_tuning", True),
            attn_scale=read.finite("attn_scale", config.get("attn_scale", 0.1)),
            floor_scale=read.positive("floor_scale", config.get("floor_scale", 8192)),
            max_position_embeddings=read.integer("max_position_embeddings", default=131072),
            bos_token_id=bos,
            eos_token_ids=eos,
            tie_word_embeddings=read.boolean("tie_word_embeddings", False),
        )

    def kv_cache_bytes(self, batch: int, context: int, itemsize: int) -> int:
        """Keys and values of every layer for `batch` rows of `context` tokens: a chunked (RoPE) layer keeps a ring
        of at most attention_chunk_size positions, a global one every position (runtime/kv_cache.py)."""
        per_position = 2 * self.num_kv_heads * self.head_dim * itemsize
        slots = sum(min(self.attention_chunk_size, context) if rope else context for rope in self.rope_layers)
        return batch * slots * per_position

    def rope_inv_freq(self) -> list[float]:
        """Inverse frequencies of the interleaved-pair RoPE, llama3 scaling applied.

        Computed in float64 here and rounded to float32 by the caller; transformers computes in
        float32, which differs by at most one ulp per frequency.
        """
        dim = self.head_dim
        inv_freq = [1.0 / (self.rope_theta ** (i / dim)) for i in range(0, dim, 2)]
        if self.rope_scaling is None:
            return inv_freq
        factor = self.rope_scaling["factor"]
        low = self.rope_scaling["low_freq_factor"]
        high = self.rope_scaling["high_freq_factor"]
        old_context = self.rope_scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context / low
        high_freq_wavelen = old_context / high
        scaled = []
        for freq in inv_freq:
            wavelen = 2 * math.pi / freq
            if wavelen < high_freq_wavelen:
                scaled.append(freq)
            elif wavelen > low_freq_wavelen:
                scaled.append(freq / factor)
            else:  # the band between: interpolate (empty when low == high, as in Scout)
                smooth = (old_context / wavelen - low) / (high - low)
                scaled.append((1 - smooth) * freq / factor + smooth * freq)
        return scaled
