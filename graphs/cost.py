"""Cost model: FLOPs and weight bytes of one engine step, counted node by node from the graph.

Concrete input dimensions (batch, new tokens, context, ring) are substituted into the graph inputs
and ONNX shape inference (with data propagation) gives every node's output shape. Then:

- MatMul / Gemm: 2 x (output elements) x (reduction length) FLOPs;
- Attention (opset 23): its two matmuls, 4 x (output elements) x (keys), plus 2 per score
  (mask and softmax), as the decomposed form counts them; GroupQueryAttention likewise, its keys the cache
  buffer's slots (which hold the new tokens too);
- data movement (Gather, Reshape, Transpose, Concat, Slice, Expand, ...): no FLOPs;
- every other node: one FLOP per output element (norms, activations, masks: small);
- weight bytes: each read of an initializer by a node counts its full size, except Gather,
  which reads only the rows it gathers (embedding lookups, per-token expert weights).

Next to the graph's count the model gives two formulas for the MoE part only (nodes under a
`/moe/` name scope), everything else being taken from the graph as is:
- ideal: active parameters only: the router, the shared expert, and k experts per token, and
  the weights of at most min(N*k, E) distinct experts per layer;
- dense: every expert on every token (transformers' formulation).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

# ops that move or index data without arithmetic
MOVEMENT = {
    "Gather",
    "GatherElements",
    "GatherND",
    "Reshape",
    "Transpose",
    "Concat",
    "Slice",
    "Squeeze",
    "Unsqueeze",
    "Expand",
    "Identity",
    "Shape",
    "Size",
    "ConstantOfShape",
    "Split",
    "Constant",
    "Cast",
    "Tile",
    "Flatten",
    "ScatterElements",
    "Range",
}


def with_ring(dims: dict[str, int], model_facts: dict[str, Any]) -> dict[str, int]:
    """dims plus `ring`, a chunked layer's cache slots at that context: min(C, context), as the
    runtime sizes rings (runtime/kv_cache.py)."""
    if "ring" in dims or "context" not in dims:
        return dims
    return {**dims, "ring": min(model_facts["attention_chunk_size"], dims["context"])}


def profile_points(profiles: dict[str, int]) -> list[tuple[str, str, dict[str, int]]]:
    """(label, role, dims) a bundle is priced and reported at: decode at batch 1 and 8 (or the
    profile's max) on a full context, prefill at 256 and 1024 tokens (within the profile) from
    an empty cache."""
    context = profiles["max_context"]
    points = [("decode b1", "decode", {"batch": 1, "new": 1, "context": context})]
    if profiles["max_batch"] > 1:
        batch = min(8, profiles["max_batch"])
        points.append((f"decode b{batch}", "decode", {"batch": batch, "new": 1, "context": context}))
    for tokens in sorted({min(256, profiles["prefill_tokens"]), min(1024, profiles["prefill_tokens"])}):
        points.append((f"prefill {tokens}", "prefill", {"batch": 1, "new": tokens, "context": 16}))
    return points


@dataclasses.dataclass(frozen=True)
class StepCost:
    flops: float
    weight_bytes: float

    def ratio(self, other: StepCost) -> tuple[float, float]:
        return self.flops / other.flops, self.weight_bytes / other.weight_bytes


@dataclasses.dataclass(frozen=True)
class CostReport:
    dims: dict[str, int]
    graph: StepCost
    ideal: StepCost
    dense: StepCost
    unresolved: int  # nodes whose output shape inference could not pin down (counted as 0)


_FOLD_LIMIT = 64  # elements; shape computations are tiny, masks and activations are not


def _fold_small_values(proto: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> bool:
    """Evaluate small nodes whose inputs are all known (constants, or Shape of a value whose shape
    inference resolved) and turn their outputs into initializers, so that inference sees the
    concrete values of shape computations (capacity, TopK's k, Reshape targets). True if any."""
    known = {
        t.name: numpy_helper.to_array(t)
        for t in proto.graph.initializer
        if t.data_location != onnx.TensorProto.EXTERNAL and np.prod(t.dims) <= _FOLD_LIMIT
    }
    folded, keep = False, []
    for node in proto.graph.node:
        values = None
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None and np.prod(value.dims) <= _FOLD_LIMIT:
                known[node.output[0]] = numpy_helper.to_array(value)
            keep.append(node)
            continue
        if node.op_type == "Shape" and node.input[0] in shapes:
            start = next((a.i for a in node.attribute if a.name == "start"), 0)
            end = next((a.i for a in node.attribute if a.name == "end"), None)
            values = [np.array(shapes[node.input[0]][start:end], dtype=np.int64)]
        elif (
            node.input
            and all(name in known for name in node.input if name)
            and all(known[name].size <= _FOLD_LIMIT for name in node.input if name)
        ):
            single = onnx.helper.make_model(
                onnx.helper.make_graph(
                    [node], "fold", [], [onnx.helper.make_value_info(o, onnx.TypeProto()) for o in node.output]
                ),
                opset_imports=proto.opset_import,
            )
            try:
                values = ReferenceEvaluator(single).run(None, {k: known[k] for k in node.input if k})
            except Exception:
                values = None
        if values is not None and all(np.asarray(v).size <= _FOLD_LIMIT for v in values):
            for name, value in zip(node.output, values):
                known[name] = np.asarray(value)
                proto.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
            folded = True
            continue
        keep.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(keep)
    return folded


_GQA = "GroupQueryAttention"  # the gqa attention form (graphs/lower_attention_gqa.py)
_SKIP_NORM = "SkipSimplifiedLayerNormalization"  # its residual add + norm (graphs/lower_skip_norm.py)


def _structure_proto(model: ir.Model) -> onnx.ModelProto:
    """The model as a proto whose large initializers are external references that are never
    read: shape inference needs their shapes only, and reading them would load every weight."""
    swapped = {}
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is not None and math.prod(tensor.shape.numpy()) > _FOLD_LIMIT:
            swapped[name] = tensor
            value.const_value = ir.ExternalTensor(
                "shape-only.bin", 0, tensor.nbytes, tensor.dtype, shape=tensor.shape, name=name
            )
    try:
        return ir.to_proto(model)
    finally:
        for name, tensor in swapped.items():
            model.graph.initializers[name].const_value = tensor


def _stand_ins(proto: onnx.ModelProto) -> None:
    """ONNX has no schema for ONNX Runtime's com.microsoft kernels, so shape inference stops at them. For shapes
    only, each becomes a standard node of the same output shape, name and output name, in one pass: MoE, QMoE and
    GroupQueryAttention (output: the first input's shape; its present outputs, the past buffers, are dropped) an
    Identity, MatMulNBits ([.., K] -> [.., N]) a MatMul by a [K, N] stand-in weight of its scales' dtype (A's:
    both are T1), declared external and never read; SkipSimplifiedLayerNormalization an Add giving its output and
    an Identity of it giving the sum. Without this, each of a
    layer's kernels cost an inference round and a many-layer graph ran out of rounds with later layers unresolved."""
    elem_types = {t.name: t.data_type for t in proto.graph.initializer}
    nodes = []
    for node in proto.graph.node:
        nodes.append(node)
        if node.domain == "com.microsoft" and node.op_type == _SKIP_NORM:  # both outputs: the sum's shape
            total = node.output[3]
            nodes.append(onnx.helper.make_node("Identity", [node.output[0]], [total], name=f"{node.name}/sum"))
            del node.input[2:], node.output[1:], node.attribute[:]
            node.op_type, node.domain = "Add", ""
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    for node in proto.graph.node:
        if node.domain != "com.microsoft" or node.op_type not in ("MoE", "QMoE", "MatMulNBits", _GQA):
            continue
        if node.op_type == _GQA:  # output: the flattened query's shape; the presents are the past buffers
            del node.output[1:]
        if node.op_type == "MatMulNBits":
            k = next(a.i for a in node.attribute if a.name == "K")
            n = next(a.i for a in node.attribute if a.name == "N")
            weight = onnx.TensorProto(
                name=f"{node.name}/shape-only",
                dims=[k, n],
                data_type=elem_types.get(node.input[2], onnx.TensorProto.FLOAT),
                data_location=onnx.TensorProto.EXTERNAL,
            )
            weight.external_data.add(key="location", value="shape-only.bin")
            proto.graph.initializer.append(weight)
            inputs, op_type = [node.input[0], weight.name], "MatMul"
        else:
            inputs, op_type = [node.input[0]], "Identity"
        del node.input[:], node.attribute[:]
        node.input.extend(inputs)
        node.op_type, node.domain = op_type, ""


def _shapes(model: ir.Model, dims: dict[str, int]) -> dict[str, tuple[int, ...] | None]:
    proto = _structure_proto(model)
    _stand_ins(proto)
    for value in proto.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in dims:
                dim.dim_value = dims[dim.dim_param]
    del proto.graph.value_info[:]
    for value in proto.graph.output:
        value.type.tensor_type.ClearField("shape")
    shapes: dict[str, tuple[int, ...]] = {}
    for _ in range(8):  # infer, fold what became known, repeat
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
        for value in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
            shape = value.type.tensor_type.shape
            if value.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in shape.dim):
                shapes[value.name] = tuple(d.dim_value for d in shape.dim)
        for tensor in proto.graph.initializer:
            shapes.setdefault(tensor.name, tuple(tensor.dims))
        if not _fold_small_values(proto, shapes):
            break
    return shapes


def _weight_bytes(value: ir.Value) -> int:
    return math.prod(value.shape.numpy()) * value.dtype.itemsize


def graph_cost(
    model: ir.Model, dims: dict[str, int], scope: str | None = None, multiplicity: Callable[[str], int] | None = None
) -> tuple[StepCost, StepCost, int]:
    """(cost of all nodes, cost of nodes whose name contains `scope`, unresolved count). `multiplicity(node
    name)`: how many times a node counts (a graph holding one layer per kind that stands for the whole model,
    llama4_deploy/build/stage_graphs.py: costing_layers); every node counts once without it."""
    return summed_cost(node_costs(model, dims), scope, multiplicity)


@dataclasses.dataclass(frozen=True)
class NodeCost:
    name: str
    flops: float
    weight_bytes: float
    unresolved: bool


def node_costs(model: ir.Model, dims: dict[str, int]) -> list[NodeCost]:
    """The FLOPs and weight bytes of every node of the graph at these dims, in graph order (one shape
    inference: several scopes and multiplicities can be summed from it)."""
    shapes = _shapes(model, dims)
    initializers = model.graph.initializers
    costs = []
    for node in model.graph:
        out = shapes.get(node.outputs[0].name) if node.outputs else None
        flops = weight = 0.0
        if out is None:
            costs.append(NodeCost(node.name or "", 0.0, 0.0, node.op_type not in ("Constant",)))
            continue
        elements = math.prod(out)
        if node.op_type in ("MatMul", "Gemm"):
            a = (
                shapes.get(node.inputs[0].name)
                if node.inputs[0].name not in initializers
                else tuple(initializers[node.inputs[0].name].shape.numpy())
            )
            flops = 2.0 * elements * (a[-1] if a else 0)
        elif node.domain == "com.microsoft" and node.op_type in ("MoE", "QMoE"):
            flops, weight = _native_moe_cost(node, out)
        elif node.domain == "com.microsoft" and node.op_type == "MatMulNBits":  # 4-bit weights: bytes below
            flops = 2.0 * elements * node.attributes["K"].as_int()
        elif node.domain in ("", "ai.onnx") and node.op_type == "Attention":
            keys = (shapes.get(node.inputs[3].name) or (0,))[-1]  # the mask's last axis: S + T
            flops = 4.0 * elements * keys + 2.0 * elements / out[-1] * keys
        elif node.domain == "com.microsoft" and node.op_type == _GQA:
            keys = (shapes.get(node.inputs[3].name) or (0, 0, 0))[2]  # the cache buffer's slots (new tokens included)
            scores = elements // (out[-1] // node.attributes["num_heads"].as_int())  # B x T x heads
            flops = 4.0 * elements * keys + 2.0 * scores * keys
        elif node.op_type in MOVEMENT:
            flops = 0.0
        else:
            flops = float(elements)
        for i, value in enumerate(node.inputs):
            if value is None or value.name not in initializers or node.op_type in ("MoE", "QMoE"):
                continue
            if node.op_type == "Gather" and i == 0:
                weight += elements * value.dtype.itemsize
            else:
                weight += _weight_bytes(value)
        costs.append(NodeCost(node.name or "", flops, weight, False))
    return costs


def summed_cost(
    costs: list[NodeCost], scope: str | None = None, multiplicity: Callable[[str], int] | None = None
) -> tuple[StepCost, StepCost, int]:
    """(all nodes, nodes whose name contains `scope`, unresolved count) of `node_costs`' list. Every figure is a
    whole number (FLOPs and bytes of integer shapes), so the sums are exact in any order and with any multiplicity."""
    total, scoped, unresolved = [0.0, 0.0], [0.0, 0.0], 0
    for cost in costs:
        times = 1 if multiplicity is None else multiplicity(cost.name)
        unresolved += times * cost.unresolved
        total[0] += times * cost.flops
        total[1] += times * cost.weight_bytes
        if scope is not None and scope in cost.name:
            scoped[0] += times * cost.flops
            scoped[1] += times * cost.weight_bytes
    return StepCost(*total), StepCost(*scoped), unresolved


def _native_moe_cost(node: ir.Node, out: tuple[int, ...]) -> tuple[float, float]:
    """ONNX Runtime's fused MoE kernel runs only the chosen experts, reading each used expert once:
    k expert evaluations per token (two matmuls, fc1 [2I, H] and fc2 [H, I]) and the weights of at
    most min(N * k, E) experts. Split experts count the same: P parts of I / P, k = P per token."""
    tokens = math.prod(out[:-1])
    top_k = node.attributes["k"].as_int()
    fc1, fc2 = node.inputs[2], node.inputs[5 if node.op_type == "QMoE" else 4]
    experts = fc1.shape[0]
    per_expert_params = math.prod(fc1.shape.numpy()[1:]) + math.prod(fc2.shape.numpy()[1:])
    per_expert_bytes = per_expert_params * fc1.dtype.itemsize
    if node.op_type == "QMoE":  # packed weights: 8 / bits values per byte, plus the block scales
        per_expert_params *= 8 // node.attributes["expert_weight_bits"].as_int()
        per_expert_bytes += sum(
            math.prod(v.shape.numpy()[1:]) * v.dtype.itemsize for v in (node.inputs[3], node.inputs[6])
        )
    flops = tokens * top_k * 2.0 * per_expert_params
    weight = min(tokens * top_k, experts) * per_expert_bytes
    return flops, weight


def moe_formula(
    model_facts: dict[str, Any], tokens: int, routed_experts_per_token: float, distinct_experts: int, itemsize: int = 4
) -> StepCost:
    """FLOPs and weight bytes of every MoE layer by formula (router, shared expert, routed experts)."""
    H, I, E = model_facts["hidden_size"], model_facts["intermediate_size"], model_facts["num_experts"]
    layers = len(model_facts["moe_layers"])
    expert_params = 3 * H * I  # gate, up, down
    flops = tokens * (2 * H * E + 2 * expert_params + routed_experts_per_token * 2 * expert_params)
    weights = (H * E + expert_params + distinct_experts * expert_params) * itemsize
    return StepCost(layers * flops, layers * weights)


def step_cost(
    model: ir.Model | list[ir.Model],
    model_facts: dict[str, Any],
    dims: dict[str, int],
    multiplicity: Callable[[str], int] | None = None,
    costs: list[list[NodeCost]] | None = None,
) -> CostReport:
    """The graph's cost for one step with these dims, next to the ideal and dense formulations. A list
    of graphs (the pipeline stages of one model) is costed as their sum. `multiplicity`: as graph_cost's;
    `costs`: the graphs' `node_costs` at these dims, when the caller has them already."""
    dims = with_ring(dims, model_facts)
    parts = model if isinstance(model, list) else [model]
    costs = costs if costs is not None else [node_costs(part, dims) for part in parts]
    graph, moe_part, unresolved = StepCost(0.0, 0.0), StepCost(0.0, 0.0), 0
    for part_costs in costs:
        part_graph, part_moe, part_unresolved = summed_cost(part_costs, "/moe/", multiplicity)
        graph = StepCost(graph.flops + part_graph.flops, graph.weight_bytes + part_graph.weight_bytes)
        moe_part = StepCost(moe_part.flops + part_moe.flops, moe_part.weight_bytes + part_moe.weight_bytes)
        unresolved += part_unresolved
    tokens = dims["batch"] * dims["new"]
    E, k = model_facts["num_experts"], model_facts["top_k"]
    rest = StepCost(graph.flops - moe_part.flops, graph.weight_bytes - moe_part.weight_bytes)
    ideal_moe = moe_formula(model_facts, tokens, k, min(tokens * k, E))
    dense_moe = moe_formula(model_facts, tokens, E, E)
    ideal = StepCost(rest.flops + ideal_moe.flops, rest.weight_bytes + ideal_moe.weight_bytes)
    dense = StepCost(rest.flops + dense_moe.flops, rest.weight_bytes + dense_moe.weight_bytes)
    return CostReport(dims, graph, ideal, dense, unresolved)
