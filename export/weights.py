"""Where each deploy-form weight comes from in a Hugging Face checkpoint, and how it is laid out.

Deploy-form modules keep linear weights in matmul layout ([in, out]) so the traced graph has a
plain MatMul on an initializer; the link pass applies `transpose` while streaming.
"""

from __future__ import annotations

import dataclasses

from llama4_deploy.export.shape import LayerKind, ModelShape


@dataclasses.dataclass(frozen=True)
class WeightSource:
    checkpoint_name: str  # as in Llama4ForCausalLM's state dict (no `language_model.` prefix)
    checkpoint_shape: tuple[int, ...]
    transpose: bool  # last two axes swapped on the way in


def layer_weights(shape: ModelShape, layer: int, kind: LayerKind) -> dict[str, WeightSource]:
    """Deploy-form parameter name -> its source, for decoder layer `layer`."""
    H, D = shape.hidden_size, shape.head_dim
    p = f"model.layers.{layer}."

    def src(name, dims, transpose=False):
        return WeightSource(p + name, tuple(dims), transpose)

    weights = {
        "input_norm": src("input_layernorm.weight", [H]),
        "post_norm": src("post_attention_layernorm.weight", [H]),
        "q": src("self_attn.q_proj.weight", [shape.num_heads * D, H], True),
        "k": src("self_attn.k_proj.weight", [shape.num_kv_heads * D, H], True),
        "v": src("self_attn.v_proj.weight", [shape.num_kv_heads * D, H], True),
        "o": src("self_attn.o_proj.weight", [H, shape.num_heads * D], True),
    }
    if kind.moe:
        E, I = shape.num_experts, shape.intermediate_size
        weights |= {
            "router": src("feed_forward.router.weight", [E, H], True),
            "experts_gate_up": src("feed_forward.experts.gate_up_proj", [E, H, 2 * I]),
            "experts_down": src("feed_forward.experts.down_proj", [E, I, H]),
            "shared_gate": src("feed_forward.shared_expert.gate_proj.weight", [I, H], True),
            "shared_up": src("feed_forward.shared_expert.up_proj.weight", [I, H], True),
            "shared_down": src("feed_forward.shared_expert.down_proj.weight", [H, I], True),
        }
    else:
        M = shape.intermediate_size_mlp
        weights |= {
            "mlp_gate": src("feed_forward.gate_proj.weight", [M, H], True),
            "mlp_up": src("feed_forward.up_proj.weight", [M, H], True),
            "mlp_down": src("feed_forward.down_proj.weight", [H, M], True),
        }
    return weights


def embed_weights(shape: ModelShape) -> dict[str, WeightSource]:
    return {"embed": WeightSource("model.embed_tokens.weight", (shape.vocab_size, shape.hidden_size), False)}


def head_weights(shape: ModelShape) -> dict[str, WeightSource]:
    head = "model.embed_tokens.weight" if shape.tie_word_embeddings else "lm_head.weight"
    return {
        "final_norm": WeightSource("model.norm.weight", (shape.hidden_size,), False),
        "lm_head": WeightSource(head, (shape.vocab_size, shape.hidden_size), True),
    }


def all_weights(shape: ModelShape) -> dict[str, WeightSource]:
    """Every checkpoint tensor the build reads, keyed by its name in the linked graph."""
    out = {f"embed.{k}": v for k, v in embed_weights(shape).items()}
    for layer, kind in enumerate(shape.layer_kinds):
        out |= {f"layers.{layer}.{k}": v for k, v in layer_weights(shape, layer, kind).items()}
    out |= {f"head.{k}": v for k, v in head_weights(shape).items()}
    return out
