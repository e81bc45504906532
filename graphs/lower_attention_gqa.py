"""Lower `llama4_deploy.Attention` (graphs/ops.py) to ONNX Runtime's `com.microsoft.GroupQueryAttention` over a KV
buffer that past and present share: the `gqa` attention form (ONNX Runtime only; the runtime binds each layer's
cache buffer as both its past_key.l input and its present_key.l output, and the kernel writes the new tokens' keys
in place, so no step copies the cache or builds a mask).

    before:  context = Attention(query, key, value, cache_mask, new_mask, past_key, past_value; scale)
             present_key.l = key; present_value.l = value                    # [B, K, T, D], the new tokens

    after:   (once per graph)  new     = ReduceSum(Cast(position_ids >= 0))                     # [B] Q_b
                               past    = past_lengths (global) | past_lengths mod C (chunked)   # [B] P_b
                               seqlens = Cast(Max(past + new, 1) - 1, int32)                     # T_b - 1
                               total   = Cast(Shape(past_key.first)[2], int32)                   # buffer slots
             attended, present_key.l, present_value.l = GroupQueryAttention(
                   Reshape(query, [0, 0, Q * D]), Reshape(Transpose(key, [0, 2, 1, 3]), [0, 0, K * D]),
                   (value likewise), past_key, past_value, seqlens, total, query_seqlens=new;
                   num_heads Q, kv_num_heads K, scale)                      # present: [B, K, S, D], the buffer
             context = Where(Unsqueeze(position_ids >= 0, 2), attended, 0)  # padded rows: finite (zeros)

    Unused nodes are removed. The prologue's masks stay where the exported layers read a dimension from their shape
    (once per step per layer kind, not per layer); no layer reads their values any more.

Why it is exact (ONNX Runtime 1.32's GroupQueryAttention, CPU; its schema's "Right-padded query chunks"):
with `query_seqlens`, row b's first Q_b query rows are its real tokens, its cache holds T_b = seqlens_k[b] + 1
tokens after the step, P_b = T_b - Q_b before it; only the Q_b real keys/values are written, at slots [P_b, T_b),
and query row s (the key at slot P_b + s) attends slots [0, P_b + s] (causal), scaled by `scale`, head h reading kv
head h // (Q / K) -- the op's grouping. `total_sequence_length` is then only an upper bound of T_b. So the
kernel computes the op exactly when slot j of row b holds the key the op's masks allow at j, for j <= P_b + s:
- Global layers: slot j holds position j (docs/engine-abi.md) and P_b = past_lengths[b]; the runtime feeds row b's
  real tokens at positions P_b, P_b + 1, ... first, padding (position -1) last, so query s sits at position
  P_b + s and the op allows exactly positions 0 .. P_b + s.
- Chunked layers: position p lives in slot p mod C; with P_b = past_lengths[b] mod C the buffer's slots
  [0, P_b) hold positions [floor(p / C) * C, p) of the current chunk, and the runtime splits a step that would cross
  a chunk boundary (P_b + T <= C for every row), so query s at position p = past_lengths[b] + s attends exactly
  [floor(p / C) * C, p], the op's chunked mask. A new chunk (P_b = 0) sees nothing of the previous one.
- Padding: a padded query row's output, unspecified by the kernel, is set to zeros (the op's is finite and
  meaningless); a padded token is never a key (never written).
  A row with no real token (Q_b = 0, idle) keeps its cache; T_b >= 1 is required, so it is given max(P_b, 1).
Only the order of floating-point sums differs from the decomposed form (the kernel's GEMM and softmax in fp32).
What stays outside the kernel, computed as before: RoPE (the kernel's rotary would take chunk-relative positions on
chunked layers unless fed position_ids, and Scout's QK norm comes after RoPE, which the CPU kernel cannot apply:
its q_norm_weight input is honored by CUDA and WebGPU only), the QK norm, and the NoPE temperature.

The runtime's side of the contract (runtime/engine.py, kv_cache.py): buffers reserved before the step so that
P_b + T fits every row's buffer (ONNX Runtime refuses otherwise), steps split at chunk boundaries, positions
contiguous from past_lengths with padding last, and the same buffer bound as past and present of each layer.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from llama4_deploy.graphs import ops
from llama4_deploy.graphs.passes import LoweringError
from llama4_deploy.graphs.rewrite import layer_scope, scoped
from llama4_deploy.runtime import abi
from llama4_deploy.runtime.integrity import CHUNK_KEY

CONTRIB = "com.microsoft"
RING = "ring"  # the symbolic cache dimension of a chunked layer (docs/engine-abi.md); global layers' is "context"


def _graph_value(graph: ir.Graph, name: str) -> ir.Value | None:
    return next((value for value in graph.inputs if value.name == name), None)


def _why_not(node: ir.Node, graph: ir.Graph, heads) -> str | None:
    """Why `node` cannot be lowered to the in-place kernel (None: it can)."""
    if isinstance(heads, str):
        return heads
    outputs = {id(value) for value in graph.outputs}
    if id(node.inputs[1]) not in outputs or id(node.inputs[2]) not in outputs:
        return (
            "has a key or value that is not a graph output (present_key.l / present_value.l), so there is no "
            "output to share the cache buffer with"
        )
    inputs = {id(value) for value in graph.inputs}
    if id(node.inputs[5]) not in inputs or id(node.inputs[6]) not in inputs:
        return "reads a past key or value that is not a graph input, so the runtime cannot bind its buffer"
    return None


def _lengths(graph: ir.Graph, chunk: int | None, first_past: ir.Value) -> tuple[ir.tape.Tape, tuple[ir.Value, ...]]:
    """The kernel's length inputs for one kind of layer, (query_seqlens, seqlens_k, total_sequence_length), and which
    query rows are real tokens ([B, T, 1] bool)."""
    tape = ir.tape.Tape()
    kind = "chunked" if chunk else "global"
    op, const = scoped(tape, f"/attention/gqa/{kind}")
    positions, past = _graph_value(graph, abi.POSITION_IDS), _graph_value(graph, abi.PAST_LENGTHS)
    valid = op("GreaterOrEqual", [positions, const("zero", np.array(0, dtype=np.int64))], name="Valid")  # [B, T]
    real = op("Cast", [valid], {"to": 7})
    new = op("ReduceSum", [real, const("axis1", np.array([1], dtype=np.int64))], {"keepdims": 0}, name="New")
    if chunk:
        past = op("Mod", [past, const("chunk", np.array(chunk, dtype=np.int64))], name="InChunk")
    total = op("Max", [op("Add", [past, new]), const("one", np.array(1, dtype=np.int64))], name="Total")
    seqlens = op("Cast", [op("Sub", [total, const("one_", np.array(1, dtype=np.int64))])], {"to": 6}, name="Seqlens")
    slots = op("Shape", [first_past], {"start": 2, "end": 3}, name="Slots")
    bound = op("Cast", [op("Squeeze", [slots, const("axis0", np.array([0], dtype=np.int64))])], {"to": 6}, name="Bound")
    rows = op("Unsqueeze", [valid, const("axis2", np.array([2], dtype=np.int64))], name="ValidRows")  # [B, T, 1]
    return tape, (op("Cast", [new], {"to": 6}, name="QuerySeqlens"), seqlens, bound, rows)


def _replace(graph: ir.Graph, node: ir.Node, outputs: list, q: int, k: int, d: int, lengths) -> None:
    """Put the kernel where `node` was; its present outputs take the places of the node's key and value in
    `outputs` (the graph's outputs, assigned by the caller), under their names."""
    query, key, value, _, _, past_key, past_value = node.inputs
    tape = ir.tape.Tape()
    op, const = scoped(tape, layer_scope(node, "attention/gqa"))

    def tokens_flat(x: ir.Value, width: int, label: str, transpose: bool = True) -> ir.Value:
        if transpose:  # [B, K, T, D] -> [B, T, K, D]
            x = op("Transpose", [x], {"perm": [0, 2, 1, 3]}, name=f"{label}T")
        shape = const(f"{label}_shape", np.array([0, 0, width], dtype=np.int64))
        return op("Reshape", [x, shape], name=f"{label}Flat")  # [B, T, width]

    query_seqlens, seqlens, bound, valid_rows = lengths
    attended, present_key, present_value = op(
        "GroupQueryAttention",
        [tokens_flat(query, q * d, "Query", transpose=False), tokens_flat(key, k * d, "Key"),
         tokens_flat(value, k * d, "Value"), past_key, past_value, seqlens, bound, *([None] * 9), query_seqlens],
        {"num_heads": q, "kv_num_heads": k, "scale": node.attributes["scale"].as_float()},
        domain=CONTRIB, num_outputs=3, name="GroupQueryAttention",
    )  # fmt: skip
    # the kernel leaves a padded query row's output unspecified (possibly not even finite): zeros there, as the op
    # promises a finite, meaningless row
    zero = const("zero", np.array(0, dtype=query.dtype.numpy() if query.dtype else np.float32))
    context = op("Where", [valid_rows, attended, zero], name="PaddedRows")
    graph.insert_before(node, tape.nodes)
    old = node.outputs[0]
    name, old.name = old.name, None
    ir.convenience.replace_all_uses_with(old, context)
    context.name, context.dtype, context.shape = name, old.dtype, old.shape
    graph.remove(node, safe=True)
    for new, before in ((present_key, key), (present_value, value)):
        slot = next(i for i, v in enumerate(outputs) if v is before)
        label, before.name = before.name, f"{layer_scope(node, 'attention/gqa')}/new_{before.name}"
        new.name, new.dtype, new.shape = label, past_key.dtype, past_key.shape
        outputs[slot] = new


def lower_gqa(model: ir.Model, heads_of) -> int:
    """Replace every llama4_deploy.Attention node of `model` by GroupQueryAttention in place; `heads_of(node)` gives
    (Q, K, D) or why they are unknown. Raises LoweringError naming the first node that cannot be lowered, before
    any is replaced. Returns the count."""
    graph = model.graph
    nodes = [node for node in graph if node.domain == ops.DOMAIN and node.op_type == ops.ATTENTION]
    if not nodes:
        return 0
    heads = [heads_of(node) for node in nodes]
    for node, found in zip(nodes, heads):
        reason = _why_not(node, graph, found)
        if reason is None and None in (_graph_value(graph, abi.POSITION_IDS), _graph_value(graph, abi.PAST_LENGTHS)):
            reason = f"is in a graph without the {abi.POSITION_IDS} and {abi.PAST_LENGTHS} inputs its lengths come from"
        if reason is not None:
            raise LoweringError(f"attention node {node.name} was not lowered to gqa: it {reason}")
    chunked = [node.inputs[5].shape is not None and node.inputs[5].shape[2] == RING for node in nodes]
    chunk = model.metadata_props.get(CHUNK_KEY)
    if any(chunked) and not (chunk or "").isdigit():
        raise LoweringError(f"attention node {nodes[chunked.index(True)].name} was not lowered to gqa: it is chunked "
                            f"and the graph does not record its chunk size ({CHUNK_KEY})")  # fmt: skip
    lengths = {}
    for node, is_chunked in zip(nodes, chunked):
        if is_chunked not in lengths:
            tape, values = _lengths(graph, int(chunk) if is_chunked else None, node.inputs[5])
            graph.insert_before(nodes[0], tape.nodes)
            lengths[is_chunked] = values
    outputs = list(graph.outputs)
    for node, (q, k, d), is_chunked in zip(nodes, heads, chunked):
        _replace(graph, node, outputs, q, k, d, lengths[is_chunked])
    graph.outputs[:] = outputs
    graph.opset_imports[CONTRIB] = 1
    common.RemoveUnusedNodesPass()(model)
    if not any(n.domain == ops.DOMAIN for n in graph):
        graph.opset_imports.pop(ops.DOMAIN, None)
    return len(nodes)
