"""Lower `llama4_deploy.Attention` (graphs/ops.py) to standard ONNX, in one of two forms.

`decomposed` (opset 21; every backend, TensorRT's form):

    before:  context = Attention(query, key, value, cache_mask, new_mask, past_key, past_value; scale)

    after:   keys    = Concat(past_key, key, axis=2)                       # [B, K, S + T, D]
             values  = Concat(past_value, value, axis=2)
             grouped = Transpose(Reshape(query, [0, 0, K, G, D]), [0, 2, 3, 1, 4])  # [B, K, G, T, D]
             scores  = MatMul(grouped, Transpose(Unsqueeze(keys, 2), [0, 1, 2, 4, 3])) * scale
             scores  = Where(Concat(cache_mask, new_mask, axis=-1), scores, lowest)
             context = MatMul(Softmax(scores), Unsqueeze(values, 2))          # [B, K, G, T, D]
             context = Reshape(Transpose(context, [0, 3, 1, 2, 4]), [0, 0, Q * D])

    It is the op's definition written out, node for node, so it is exact by construction.

`onnx23` (ONNX Runtime: the opset-23 `Attention` op, one kernel instead of ~12 nodes):

    after:   bias     = Where(Squeeze(Concat(cache_mask, new_mask, axis=-1), 1), 0, lowest / 2)  # [B, 1, T, S + T]
             y, _, _  = Attention(Transpose(query, [0, 2, 1, 3]), key, value, bias, past_key, past_value;
                                  scale)                                     # y [B, Q, T, D]
             context  = Reshape(Transpose(y, [0, 2, 1, 3]), [0, 0, Q * D])

    Why it matches: opset-23 Attention with 4-D inputs takes Q [B, Q, T, D] and K/V [B, K, T, D]
    with Q a multiple of K (head h reads kv head h // G, as in the op), concatenates past and
    new keys along the sequence exactly like the op, and adds a float mask to scale * Q.K^T
    before the softmax. The mask is additive rather than boolean so a fully masked (padded) row
    stays finite instead of NaN; half the dtype's lowest value leaves room for any score without
    reaching -inf (in float16 too), and still sends every masked weight to exactly 0 next to an
    allowed entry. Allowed entries add 0. Only the order of the floating-point sums differs from
    decomposed (and a padded row's meaningless output).
    The op's present_key/present_value outputs (past and new keys concatenated) are declared
    because ONNX Runtime's CPU kernel requires them whenever past is given; nothing reads them.
    The model's default opset becomes 23.

`gqa` (ONNX Runtime: com.microsoft.GroupQueryAttention over a cache buffer shared by past and present, written in
place) is its own file, graphs/lower_attention_gqa.py, with its exactness argument; this pass dispatches to it.

Every form reads the head counts from the query and key shapes (Q, K and D must be known).
"""

from __future__ import annotations

import ml_dtypes  # finfo for bfloat16 too
import numpy as np
import onnx_ir as ir

from llama4_deploy.graphs import ops
from llama4_deploy.graphs.forms import AttentionForm, values
from llama4_deploy.graphs.lower_attention_gqa import lower_gqa
from llama4_deploy.graphs.passes import FormPass, LoweringError
from llama4_deploy.graphs.rewrite import layer_scope, scoped, splice

FORMS: tuple[str, ...] = values(AttentionForm)
ONNX23 = 23
IR_VERSION_FOR_23 = 11  # the IR version that introduced opset 23


def attention_nodes(model: ir.Model) -> list[ir.Node]:
    return [node for node in model.graph if node.domain == ops.DOMAIN and node.op_type == ops.ATTENTION]


def _heads(node: ir.Node) -> tuple[int, int, int] | str:
    """(Q, K, D) from the query and key shapes, or why they are unknown."""
    query, key = node.inputs[0].shape, node.inputs[1].shape
    if query is None or key is None or len(query) != 4 or len(key) != 4:
        return "has a query or key without a known rank-4 shape"
    q, d, k = query[2], query[3], key[1]
    if not all(isinstance(v, int) for v in (q, d, k)) or q % k:
        return f"has query heads {q}, kv heads {k} and head size {d}; expected integers with Q a multiple of K"
    return q, k, d


def _decomposed(op, const, inputs, scale: float, dtype, q: int, k: int, d: int) -> ir.Value:
    query, key, value, cache_mask, new_mask, past_key, past_value = inputs
    axis2 = const("axis2", np.array([2], dtype=np.int64))
    keys = op("Concat", [past_key, key], {"axis": 2}, name="Keys")
    values = op("Concat", [past_value, value], {"axis": 2}, name="Values")
    grouped = op(
        "Transpose",
        [
            op(
                "Reshape",
                [query, const("grouped_shape", np.array([0, 0, k, q // k, d], dtype=np.int64))],
                name="GroupQuery",
            )
        ],
        {"perm": [0, 2, 3, 1, 4]},
        name="GroupQueryT",
    )
    keys_t = op("Transpose", [op("Unsqueeze", [keys, axis2], name="KeysU")], {"perm": [0, 1, 2, 4, 3]}, name="KeysT")
    scores = op(
        "Mul",
        [op("MatMul", [grouped, keys_t], name="Scores"), const("scale", np.array(scale, dtype=dtype))],
        name="Scale",
    )
    mask = op("Concat", [cache_mask, new_mask], {"axis": -1}, name="Mask")
    scores = op(
        "Where", [mask, scores, const("lowest", np.array(ml_dtypes.finfo(dtype).min, dtype=dtype))], name="Masked"
    )
    context = op(
        "MatMul",
        [op("Softmax", [scores], {"axis": -1}), op("Unsqueeze", [values, axis2], name="ValuesU")],
        name="Context",
    )
    context = op("Transpose", [context], {"perm": [0, 3, 1, 2, 4]}, name="ContextT")
    return op("Reshape", [context, const("out_shape", np.array([0, 0, q * d], dtype=np.int64))], name="Out")


def _onnx23(op, const, inputs, scale: float, dtype, q: int, k: int, d: int) -> ir.Value:
    query, key, value, cache_mask, new_mask, past_key, past_value = inputs
    mask = op(
        "Squeeze",
        [
            op("Concat", [cache_mask, new_mask], {"axis": -1}, name="Mask"),
            const("axis1", np.array([1], dtype=np.int64)),
        ],
        name="Mask4",
    )  # [B, 1, T, S + T]
    bias = op(
        "Where",
        [
            mask,
            const("zero", np.array(0, dtype=dtype)),
            const("floor", np.array(ml_dtypes.finfo(dtype).min / 2, dtype=dtype)),
        ],
        name="Bias",
    )
    heads_first = op("Transpose", [query], {"perm": [0, 2, 1, 3]}, name="QueryT")  # [B, Q, T, D]
    y, _, _ = op("Attention", [heads_first, key, value, bias, past_key, past_value], {"scale": scale}, num_outputs=3)
    context = op("Transpose", [y], {"perm": [0, 2, 1, 3]}, name="ContextT")
    return op("Reshape", [context, const("out_shape", np.array([0, 0, q * d], dtype=np.int64))], name="Out")


class LowerAttentionPass(FormPass):
    """Replace every llama4_deploy.Attention node by the form given; raises LoweringError naming the first node
    whose head counts are unknown, before any is replaced."""

    forms, family, what = FORMS, "lower_attention", "attention form"

    def rewrite(self, model: ir.Model) -> int:
        if self.form == "gqa":
            return lower_gqa(model, _heads)
        build = _decomposed if self.form == "decomposed" else _onnx23
        graph = model.graph
        nodes = attention_nodes(model)
        heads = [_heads(node) for node in nodes]
        for node, reason in zip(nodes, heads):
            if isinstance(reason, str):
                raise LoweringError(f"attention node {node.name} was not lowered to {self.form}: it {reason}")
        for node, (q, k, d) in zip(nodes, heads):
            tape = ir.tape.Tape()
            query = node.inputs[0]
            dtype = query.dtype.numpy() if query.dtype else np.float32
            out = build(
                *scoped(tape, layer_scope(node, f"attention/{self.form}")),
                node.inputs,
                node.attributes["scale"].as_float(),
                dtype,
                q,
                k,
                d,
            )
            out.dtype, out.shape = node.outputs[0].dtype, node.outputs[0].shape
            splice(graph, node, tape, out)
        if nodes and self.form == "onnx23":
            graph.opset_imports[""] = max(graph.opset_imports.get("", ONNX23), ONNX23)
            model.ir_version = max(model.ir_version or 0, IR_VERSION_FOR_23)
        if not any(n.domain == ops.DOMAIN for n in graph):
            graph.opset_imports.pop(ops.DOMAIN, None)
        return len(nodes)
