"""Deploy-form Llama 4 modules: the model written for tracing.

Differences from transformers' eager modules, all numerically neutral:
- The KV cache is explicit I/O owned by the runtime. Global (NoPE) layers read a cache whose
  slot j holds position j; chunked (RoPE) layers read a ring buffer of S = min(C, bucket) slots
  (C = attention_chunk_size) where position p lives in slot p mod C. Each layer returns the new
  tokens' keys and values only.
- Masks are computed from `position_ids` and `past_lengths`, so rows of a batch may have
  different lengths. A position of -1 marks a padded token: it is never a valid key, and its
  own (meaningless) output is finite. Masks, RoPE angles and the NoPE temperature are
  computed once per step by the `Prologue` and shared by every layer of a kind.
- RoPE is real-valued on interleaved pairs (2i, 2i+1); no complex numbers.
- The MoE is one call to the custom op `llama4_deploy::moe`, exported as a single
  `llama4_deploy.MoE` node (graphs/ops.py) that graph passes lower; likewise the masked
  attention over cache and new keys (`llama4_deploy::attention`, `llama4_deploy.Attention`).
- Linear weights are stored in matmul layout [in, out] (export/weights.py transposes).

Nothing here branches on tensor values, calls .item() or .tolist().
"""

from __future__ import annotations

import onnxscript
import torch
from torch import nn

from llama4_deploy.export.shape import LayerKind, ModelShape
from llama4_deploy.graphs import ops


@torch.library.custom_op("llama4_deploy::moe", mutates_args=())
def moe(
    x: torch.Tensor,
    router: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    shared_gate: torch.Tensor,
    shared_up: torch.Tensor,
    shared_down: torch.Tensor,
    token_valid: torch.Tensor,
    top_k: int,
) -> torch.Tensor:
    """Eager semantics of llama4_deploy.MoE (see graphs/ops.py): every expert on every token.
    `token_valid` does not change any valid token's output; lowerings use it for capacity."""
    logits = x @ router  # [N, E]
    top_value, top_index = torch.topk(logits, top_k, dim=-1)
    scores = torch.sigmoid(torch.full_like(logits, float("-inf")).scatter(1, top_index, top_value))
    routed_in = scores.t()[:, :, None] * x[None]  # [E, N, H]
    gate, up = torch.bmm(routed_in, gate_up).chunk(2, dim=-1)
    routed = torch.bmm(nn.functional.silu(gate) * up, down).sum(0)
    shared = (nn.functional.silu(x @ shared_gate) * (x @ shared_up)) @ shared_down
    return shared + routed


@moe.register_fake
def _moe_fake(x, router, gate_up, down, shared_gate, shared_up, shared_down, token_valid, top_k):
    return torch.empty_like(x)


def moe_to_onnx(x, router, gate_up, down, shared_gate, shared_up, shared_down, token_valid, top_k: int):
    """Translation of the custom op for torch.onnx.export: one node of the project's domain."""
    ops.register_schemas()
    node = onnxscript.values.Op(onnxscript.values.Opset(ops.DOMAIN, ops.VERSION), ops.MOE)
    return node(x, router, gate_up, down, shared_gate, shared_up, shared_down, token_valid, top_k=top_k)


@torch.library.custom_op("llama4_deploy::attention", mutates_args=())
def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cache_mask: torch.Tensor,
    new_mask: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Eager semantics of llama4_deploy.Attention (see graphs/ops.py). query [B, T, Q, D]; key,
    value [B, K, T, D]; masks [B, 1, 1, T, S] and [B, 1, 1, T, T]; past [B, K, S, D]."""
    B, T, Q, D = query.shape
    K = key.shape[1]
    keys = torch.cat([past_key, key], dim=2)  # [B, K, S + T, D]
    values = torch.cat([past_value, value], dim=2)
    grouped_query = query.reshape(B, T, K, Q // K, D).permute(0, 2, 3, 1, 4)  # [B, K, G, T, D]
    scores = grouped_query @ keys[:, :, None].transpose(-1, -2) * scale  # [B, K, G, T, S + T]
    # a finite floor keeps fully masked (padded) rows finite instead of NaN
    mask = torch.cat([cache_mask, new_mask], dim=-1)  # [B, 1, 1, T, S + T]
    scores = torch.where(mask, scores, torch.finfo(scores.dtype).min)
    context = scores.softmax(-1) @ values[:, :, None]  # [B, K, G, T, D]
    return context.permute(0, 3, 1, 2, 4).reshape(B, T, Q * D)


@attention.register_fake
def _attention_fake(query, key, value, cache_mask, new_mask, past_key, past_value, scale):
    B, T, Q, D = query.shape
    return query.new_empty(B, T, Q * D)


def attention_to_onnx(query, key, value, cache_mask, new_mask, past_key, past_value, scale: float):
    """Translation of the custom op for torch.onnx.export: one node of the project's domain."""
    ops.register_schemas()
    node = onnxscript.values.Op(onnxscript.values.Opset(ops.DOMAIN, ops.VERSION), ops.ATTENTION)
    return node(query, key, value, cache_mask, new_mask, past_key, past_value, scale=scale)


def _param(*dims: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*dims))


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    # written as a division so ONNX Runtime fuses it into SimplifiedLayerNormalization
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def pair_rotation(head_dim: int) -> torch.Tensor:
    """[D, D] matrix P with (x @ P) swapping each interleaved pair (x0, x1) into (-x1, x0).

    Every column has a single +-1, so the product is exact; it replaces the unflatten / select /
    stack of the pairs with one MatMul."""
    rotation = torch.zeros(head_dim, head_dim)
    even = torch.arange(0, head_dim, 2)
    rotation[even + 1, even] = -1.0
    rotation[even, even + 1] = 1.0
    return rotation


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2i, 2i+1) by angle i. x [B, T, heads, D]; cos, sin [B, T, 1, D]
    (each angle repeated for both members of its pair)."""
    return x * cos + (x @ rotation) * sin


class Prologue(nn.Module):
    """What every layer of a kind shares, computed once per step from positions and lengths:
    the attention masks of chunked and global layers, RoPE cos/sin, the NoPE temperature
    scale, and which tokens are real (position -1 marks padding).

    Inputs: position_ids [B, T], past_lengths [B], and the cache of the first chunked layer and
    of the first global layer, where the model has them (only their slot counts are read: the
    runtime sizes both kinds of cache by the filled context, a ring never beyond C).
    """

    def __init__(self, shape: ModelShape, has_rope: bool | None = None, has_global: bool | None = None):
        """has_rope / has_global: whether the layers it serves include chunked / global ones (default: the
        model's; a pipeline stage's prologue serves only its own layers)."""
        super().__init__()
        self.shape = shape
        self.has_rope = any(shape.rope_layers) if has_rope is None else has_rope
        self.has_global = (not all(shape.rope_layers)) if has_global is None else has_global
        if self.has_rope:
            # each frequency twice, once per member of its pair: cos/sin come out [.., D] directly
            inv_freq = torch.tensor(shape.rope_inv_freq(), dtype=torch.float32).repeat_interleave(2)
            self.register_buffer("rope_inv_freq", inv_freq, persistent=False)

    @staticmethod
    def outputs(shape: ModelShape, has_rope: bool | None = None, has_global: bool | None = None) -> tuple[str, ...]:
        has_rope = any(shape.rope_layers) if has_rope is None else has_rope
        has_global = (not all(shape.rope_layers)) if has_global is None else has_global
        names = ["token_valid"]
        if has_rope:
            names += ["chunked_cache_mask", "chunked_new_mask", "rope_cos", "rope_sin"]
        if has_global:
            names += ["global_cache_mask", "global_new_mask"]
            if shape.attn_temperature_tuning:
                names += ["temperature"]
        return tuple(names)

    def mask(self, position_ids, past_lengths, cache_slots, chunked: bool):
        """Which keys query t may attend: ([B, 1, 1, T, S] over cache slots, [B, 1, 1, T, T] over
        the new tokens). Two tensors so that every dimension is an input dimension."""
        slot = torch.arange(cache_slots, device=position_ids.device)[None, :]  # [1, S]
        filled = past_lengths[:, None]  # [B, 1]
        if chunked:
            # ring of S = min(C, bucket) slots: slot s holds the newest position p < filled with
            # p mod S == s. While S < C every filled position is below S (p mod C == p mod S == p),
            # and once a row passes C the runtime hands in the full ring (S == C).
            ring = slot.new_full((1, 1), cache_slots)  # a tensor: S is a dynamic dimension
            cache_pos = filled - 1 - torch.remainder(filled - 1 - slot, ring)
            cache_valid = cache_pos >= 0
        else:
            cache_pos = slot.expand(past_lengths.shape[0], cache_slots)
            cache_valid = slot < filled
        key_pos = torch.cat([cache_pos, position_ids], dim=1)  # [B, S + T]
        key_valid = torch.cat([cache_valid, position_ids >= 0], dim=1)
        query_pos = position_ids[:, :, None]  # [B, T, 1]
        allowed = key_valid[:, None, :] & (key_pos[:, None, :] <= query_pos)
        if chunked:
            chunk = self.shape.attention_chunk_size
            chunk_start = torch.div(query_pos, chunk, rounding_mode="floor") * chunk
            allowed = allowed & (key_pos[:, None, :] >= chunk_start)
        allowed = allowed[:, None, None]
        return allowed[..., :cache_slots], allowed[..., cache_slots:]

    def forward(self, position_ids, past_lengths, *past_keys):
        """past_keys: the first chunked layer's cache (if any), then the first global layer's (if any)."""
        shape = self.shape
        chunked_past_key = past_keys[0] if self.has_rope else None
        global_past_key = past_keys[-1] if self.has_global else None
        outputs = [(position_ids >= 0).reshape(-1)]  # token_valid [B * T]
        positions = position_ids.to(torch.float32)[:, :, None, None]  # [B, T, 1, 1]
        if self.has_rope:
            outputs.extend(self.mask(position_ids, past_lengths, chunked_past_key.shape[2], chunked=True))
            angles = positions * self.rope_inv_freq  # [B, T, 1, D]: angle i at 2i and 2i + 1
            outputs.append(torch.cos(angles))
            outputs.append(torch.sin(angles))
        if self.has_global:
            outputs.extend(self.mask(position_ids, past_lengths, global_past_key.shape[2], chunked=False))
            if shape.attn_temperature_tuning:
                outputs.append(torch.log1p(torch.floor((positions + 1.0) / shape.floor_scale)) * shape.attn_scale + 1.0)
        return tuple(outputs)


class DecoderLayer(nn.Module):
    """One Llama 4 decoder layer of a given kind, with runtime-owned KV cache.

    Shapes: B batch, T new tokens, S cache slots (the context bucket for global layers, min(C, bucket) for chunked),
    H hidden, D head_dim, Q query heads, K kv heads, G = Q / K.
    """

    def __init__(self, shape: ModelShape, kind: LayerKind):
        super().__init__()
        self.shape, self.kind = shape, kind
        H, D = shape.hidden_size, shape.head_dim
        self.input_norm = _param(H)
        self.post_norm = _param(H)
        self.q = _param(H, shape.num_heads * D)
        self.k = _param(H, shape.num_kv_heads * D)
        self.v = _param(H, shape.num_kv_heads * D)
        self.o = _param(shape.num_heads * D, H)
        if kind.moe:
            E, I = shape.num_experts, shape.intermediate_size
            self.router = _param(H, E)
            self.experts_gate_up = _param(E, H, 2 * I)
            self.experts_down = _param(E, I, H)
            self.shared_gate = _param(H, I)
            self.shared_up = _param(H, I)
            self.shared_down = _param(I, H)
        else:
            M = shape.intermediate_size_mlp
            self.mlp_gate = _param(H, M)
            self.mlp_up = _param(H, M)
            self.mlp_down = _param(M, H)
        if kind.rope:
            self.register_buffer("rope_rotation", pair_rotation(D), persistent=False)

    @staticmethod
    def inputs(shape: ModelShape, kind: LayerKind) -> tuple[str, ...]:
        """Template input names; the prologue's outputs keep their names."""
        scope = "chunked" if kind.rope else "global"
        names = ["hidden_states", f"{scope}_cache_mask", f"{scope}_new_mask"]
        if kind.rope:
            names += ["rope_cos", "rope_sin"]
        elif shape.attn_temperature_tuning:
            names += ["temperature"]
        if kind.moe:
            names += ["token_valid"]
        return tuple(names + ["past_key", "past_value"])

    # -- attention ------------------------------------------------------------------------------
    def attention(self, x, cache_mask, new_mask, rope_cos, rope_sin, temperature, past_key, past_value):
        shape = self.shape
        B, T = x.shape[0], x.shape[1]
        Q, K, D = shape.num_heads, shape.num_kv_heads, shape.head_dim
        query = (x @ self.q).view(B, T, Q, D)
        key = (x @ self.k).view(B, T, K, D)
        value = (x @ self.v).view(B, T, K, D)
        if self.kind.rope:
            query = apply_rope(query, rope_cos, rope_sin, self.rope_rotation)
            key = apply_rope(key, rope_cos, rope_sin, self.rope_rotation)
            if shape.use_qk_norm:
                query, key = rms_norm(query, shape.rms_norm_eps), rms_norm(key, shape.rms_norm_eps)
        elif temperature is not None:
            query = query * temperature  # [B, T, 1, 1]

        present_key = key.transpose(1, 2)  # [B, K, T, D]
        present_value = value.transpose(1, 2)
        context = torch.ops.llama4_deploy.attention(query, present_key, present_value, cache_mask, new_mask,
                                                    past_key, past_value, D**-0.5)  # [B, T, Q * D]  # fmt: skip
        return context @ self.o, present_key, present_value

    # -- feed-forward ---------------------------------------------------------------------------
    def feed_forward(self, x, token_valid):
        if not self.kind.moe:
            return (nn.functional.silu(x @ self.mlp_gate) * (x @ self.mlp_up)) @ self.mlp_down
        tokens = x.reshape(-1, x.shape[-1])
        routed = torch.ops.llama4_deploy.moe(
            tokens,
            self.router,
            self.experts_gate_up,
            self.experts_down,
            self.shared_gate,
            self.shared_up,
            self.shared_down,
            token_valid,  # padding never takes expert capacity
            self.shape.top_k,
        )
        return routed.view(x.shape)

    def forward(self, hidden_states, *args):
        names = self.inputs(self.shape, self.kind)
        named = dict(zip(names[1:], args))
        eps = self.shape.rms_norm_eps
        attended, present_key, present_value = self.attention(
            rms_norm(hidden_states, eps) * self.input_norm,
            named[names[1]],
            named[names[2]],
            named.get("rope_cos"),
            named.get("rope_sin"),
            named.get("temperature"),
            named["past_key"],
            named["past_value"],
        )
        hidden_states = hidden_states + attended
        hidden_states = hidden_states + self.feed_forward(
            rms_norm(hidden_states, eps) * self.post_norm, named.get("token_valid")
        )
        return hidden_states, present_key, present_value


class Embed(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        self.embed = _param(shape.vocab_size, shape.hidden_size)

    def forward(self, input_ids):
        return nn.functional.embedding(input_ids, self.embed)


class Head(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        self.eps = shape.rms_norm_eps
        self.final_norm = _param(shape.hidden_size)
        self.lm_head = _param(shape.hidden_size, shape.vocab_size)

    def forward(self, hidden_states):
        return (rms_norm(hidden_states, self.eps) * self.final_norm) @ self.lm_head
