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
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        """Build from a config.json dict (model_type llama4_text, or llama4 with a text_config)."""
        model_type = config.get("model_type")
        if model_type == "llama4":
            if not isinstance(config.get("text_config"), dict):
                raise ConfigError("config.json has model_type 'llama4' but no text_config")
            config = config["text_config"]
            model_type = config.get("model_type", "llama4_text")
        if model_type != "llama4_text":
            raise ConfigError(
                f"config.json has model_type {model_type!r}; expected 'llama4_text' or 'llama4' (a Llama 4 checkpoint)"
            )

        def need(key: str) -> Any:
            if config.get(key) is None:
                raise ConfigError(f"config.json lacks {key!r}, which a Llama 4 text config must have")
            return config[key]

        num_layers = int(need("num_hidden_layers"))
        hidden = int(need("hidden_size"))
        num_heads = int(need("num_attention_heads"))
        num_kv_heads = int(config.get("num_key_value_heads") or num_heads)
        head_dim = int(config.get("head_dim") or hidden // num_heads)
        if num_heads % num_kv_heads:
            raise ConfigError(
                f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            )
        if head_dim % 2:
            raise ConfigError(f"head_dim {head_dim} is odd; RoPE rotates pairs")

        step = int(config.get("interleave_moe_layer_step", 1))
        moe_layers = config.get("moe_layers")
        if moe_layers is None:
            moe_layers = list(range(step - 1, num_layers, step))
        interval = int(config.get("no_rope_layer_interval", 4))
        no_rope_layers = config.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(num_layers)]
        if len(no_rope_layers) < num_layers:
            raise ConfigError(f"no_rope_layers has {len(no_rope_layers)} entries for {num_layers} layers")

        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"rope_type {rope_type!r} is not supported; Llama 4 uses {SUPPORTED_ROPE_TYPES}")
        theta = float(rope.get("rope_theta", config.get("rope_theta", 500000.0)))
        scaling = None
        if rope_type == "llama3":
            scaling = {
                "factor": float(rope["factor"]),
                "low_freq_factor": float(rope["low_freq_factor"]),
                "high_freq_factor": float(rope["high_freq_factor"]),
                "original_max_position_embeddings": int(rope["original_max_position_embeddings"]),
            }

        chunk = config.get("attention_chunk_size")
        if chunk is None:
            raise ConfigError("config.json has attention_chunk_size null; Llama 4's RoPE layers need a chunk size")
        if config.get("attention_bias"):
            raise ConfigError("attention_bias is true; Llama 4 attention has no bias")
        if config.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {config.get('hidden_act')!r} is not supported; Llama 4 uses 'silu'")

        eos = config.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            intermediate_size_mlp=int(config.get("intermediate_size_mlp") or need("intermediate_size")),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            num_experts=int(need("num_local_experts")),
            top_k=int(config.get("num_experts_per_tok", 1)),
            moe_layers=tuple(int(i) for i in moe_layers),
            rope_layers=tuple(bool(int(v)) for v in no_rope_layers[:num_layers]),
            attention_chunk_size=int(chunk),
            use_qk_norm=bool(config.get("use_qk_norm", True)),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
            rope_theta=theta,
            rope_scaling=scaling,
            attn_temperature_tuning=bool(config.get("attn_temperature_tuning", True)),
            attn_scale=float(config.get("attn_scale", 0.1)),
            floor_scale=float(config.get("floor_scale", 8192)),
            max_position_embeddings=int(config.get("max_position_embeddings", 131072)),
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=eos_ids,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )

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
