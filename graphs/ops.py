"""The project's ONNX domain: high-level ops that the deploy-form model emits as single nodes.

`llama4_deploy.MoE` (version 1) — Llama 4's routed mixture of experts plus the shared expert:

    inputs   x            [N, H]       tokens (batch and sequence flattened)
             router       [H, E]       router weight, matmul layout
             gate_up      [E, H, 2I]   stacked expert weights, gate columns first, then up
             down         [E, I, H]
             shared_gate  [H, I]       shared expert, matmul layout
             shared_up    [H, I]
             shared_down  [I, H]
             token_valid  [N] bool     optional; false for padding, which must not take expert capacity
    attrs    top_k        experts per token (Llama 4: 1)
    output   y            [N, H]

    logits = x @ router;  chosen = top_k(logits)
    score[n, e] = sigmoid(logits[n, e]) if e in chosen[n] else 0
    y = shared(x) + sum_e expert_e(score[:, e] * x)          # the score scales the expert *input*
    expert_e(z) = (silu(z @ gate_e) * (z @ up_e)) @ down_e

`llama4_deploy.Attention` (version 1) — masked grouped-query attention over the cache and the step's
new keys, after RoPE / QK norm / temperature (Q query heads, K kv heads, G = Q / K):

    inputs   query        [B, T, Q, D]
             key          [B, K, T, D]   the step's new keys (also the engine's present_key output)
             value        [B, K, T, D]
             cache_mask   [B, 1, 1, T, S] bool   which cache slots query t may attend
             new_mask     [B, 1, 1, T, T] bool   which new tokens query t may attend
             past_key     [B, K, S, D]
             past_value   [B, K, S, D]
    attrs    scale        softmax scale (D ** -0.5)
    output   context      [B, T, Q * D]

    keys = [past_key | key] along S;  query head h reads kv head h // G
    scores = scale * query . keys, masked entries set to the dtype's lowest finite value
    context = softmax(scores) . [past_value | value]       # a fully masked row stays finite

Passes in graphs/ lower both to standard ONNX (lower_moe_*.py, lower_attention.py); no backend
runs them as they are.
"""

from __future__ import annotations

import onnx

# onnx.reference builds its operator table once, at import, and refuses a name two domains share (our Attention and
# opset 23's): imported before register_schemas adds ours, so graphs/cost.py's constant folding works either way
import onnx.reference  # noqa: F401
from onnx.defs import OpSchema

DOMAIN = "llama4_deploy"
VERSION = 1
MOE = "MoE"
MOE_INPUTS = ("x", "router", "gate_up", "down", "shared_gate", "shared_up", "shared_down", "token_valid")
ATTENTION = "Attention"
FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
ATTENTION_INPUTS = ("query", "key", "value", "cache_mask", "new_mask", "past_key", "past_value")


def _moe_schema() -> OpSchema:
    return OpSchema(
        MOE,
        DOMAIN,
        VERSION,
        doc=__doc__,
        inputs=[OpSchema.FormalParameter(name, "T") for name in MOE_INPUTS[:-1]]
        + [OpSchema.FormalParameter("token_valid", "B", param_option=OpSchema.FormalParameterOption.Optional)],
        outputs=[OpSchema.FormalParameter("y", "T")],
        type_constraints=[("T", FLOAT_TYPES, "activations and weights"), ("B", ["tensor(bool)"], "token mask")],
        attributes=[OpSchema.Attribute("top_k", OpSchema.AttrType.INT, "experts per token")],
    )


def _attention_schema() -> OpSchema:
    return OpSchema(
        ATTENTION,
        DOMAIN,
        VERSION,
        doc=__doc__,
        inputs=[OpSchema.FormalParameter(name, "B" if name.endswith("_mask") else "T") for name in ATTENTION_INPUTS],
        outputs=[OpSchema.FormalParameter("context", "T")],
        type_constraints=[("T", FLOAT_TYPES, "activations"), ("B", ["tensor(bool)"], "masks")],
        attributes=[OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "softmax scale")],
    )


def register_schemas() -> None:
    """Make onnx (and the exporter, which checks schemas) aware of the project's ops. Idempotent."""
    if not onnx.defs.has(MOE, DOMAIN):
        onnx.defs.register_schema(_moe_schema())
    if not onnx.defs.has(ATTENTION, DOMAIN):
        onnx.defs.register_schema(_attention_schema())
