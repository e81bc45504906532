"""Lower `llama4_deploy.MoE` to ONNX Runtime's fused contrib op `com.microsoft.MoE` (`native`).

    before:  y = MoE(x, router, gate_up, down, shared_gate, shared_up, shared_down; top_k=1)

    after:   logits        = MatMul(x, router)                         # [N, E]
             value, index  = TopK(logits, 1)                           # [N, 1]
             routed_in     = x * Sigmoid(value)                        # [N, H]  score scales the input
             one_hot       = ScatterElements(zeros[N, E], index, ones[N, 1], axis=1)
             routed        = com.microsoft.MoE(routed_in, one_hot, fc1, None, fc2;
                                 k=1, activation_type="swiglu", swiglu_fusion=1,
                                 activation_alpha=1, activation_beta=0,
                                 normalize_routing_weights=1, use_sparse_mixer=0)
             y             = shared(x) + routed

    weights (new initializers, computed lazily from the originals at serialization time):
             fc1 = `<gate_up>.native_fc1`  [E, 2I, H]  row 2i = gate column i, row 2i+1 = up column i
             fc2 = `<down>.native_fc2`     [E, H, I]   down transposed per expert

The op (ORT 1.32 CPU kernel, moe_cpu.cc): `router_probs` are *logits*: per token the kernel
takes softmax over E, picks the top k, and with normalize_routing_weights=1 weights each pick by
p / sum(top-k p); it computes expert(x_n) = fc2 @ act(fc1 @ x_n) (both weights used transposed,
i.e. stored [out, in]) and returns sum over picks of weight * expert(x_n). With swiglu_fusion=1
FC1's output row is interleaved [g0, l0, g1, l1, ...] and act = G * sigmoid(alpha * G) *
(L + beta) with no clamp unless swiglu_limit is given. The CPU kernel accepts only
swiglu_fusion=1 for swiglu (2, concatenated [g | l], throws at session creation), and no FC3.

Why it is exact: the one-hot row's softmax has its unique maximum e / (e + E - 1) at the expert
TopK chose, so the kernel routes each token to exactly that expert; with k=1 and normalization
the weight is p / p = 1.0 exactly. alpha=1, beta=0, no limit makes the activation
silu(g) * u, the Llama 4 expert. Llama 4 scales the expert's *input* by sigmoid(logit) (not its
output, the expert being nonlinear), so the score goes into routed_in, as in the reference. The
kernel's own softmax routing is bypassed entirely (Llama 4 routes by sigmoid, not softmax), and
the choice is TopK's, with ONNX's tie rule (lowest index), like the other lowerings.

Only top_k == 1: for k > 1 the kernel's weights would have to be sigmoid(logit) per pick on
experts fed with differently scaled inputs, which a single pre-scaled input cannot express.
token_valid is ignored: the op has no capacity for padding to take. The CPU kernel runs float
and float16. Cost: the routed FLOPs exactly; expert weights are read in place.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from llama4_deploy.graphs import ops
from llama4_deploy.graphs.lower_moe_dense import constant, shared_expert
from llama4_deploy.graphs.moe_pass import moe_nodes, run_moe_lowering

STRATEGY = "native"
MS_DOMAIN = "com.microsoft"
MS_VERSION = 1
FC1_SUFFIX = ".native_fc1"
FC2_SUFFIX = ".native_fc2"


def _constant_weight(value: ir.Value) -> bool:
    return value.const_value is not None and value.is_initializer()


def check(node: ir.Node) -> str | None:
    """Why `node` cannot be lowered, or None."""
    if len(node.inputs) not in (len(ops.MOE_INPUTS) - 1, len(ops.MOE_INPUTS)) or any(
        v is None for v in node.inputs[: len(ops.MOE_INPUTS) - 1]
    ):
        return f"has {len(node.inputs)} inputs, expected {len(ops.MOE_INPUTS)}"
    top_k = node.attributes.get("top_k")
    if top_k is None or top_k.as_int() < 1:
        return "has no positive top_k attribute"
    if top_k.as_int() != 1:
        return (f"has top_k {top_k.as_int()}; com.microsoft.MoE can express only top_k 1 "
                "(Llama 4 scales each expert's input by its own score, the op weights outputs)")
    gate_up, down = node.inputs[2], node.inputs[3]
    for role, value in (("gate_up", gate_up), ("down", down)):
        if not _constant_weight(value):
            return (f"has a {role} input ({value.name}) that is not an initializer with a value, "
                    "so it cannot be re-laid out")
    gu, dn = gate_up.const_value.shape, down.const_value.shape
    if len(gu) != 3 or len(dn) != 3 or gu[2] % 2 or gu[0] != dn[0] or gu[2] != 2 * dn[1] or gu[1] != dn[2]:
        return f"has expert weights of shapes {list(gu)} and {list(dn)}, expected [E, H, 2I] and [E, I, H]"
    router_shape = node.inputs[1].shape
    if router_shape is not None and isinstance(router_shape[-1], int) and router_shape[-1] != gu[0]:
        return f"has a router over {router_shape[-1]} experts but {gu[0]} expert weights"
    return None


def fc1_layout(gate_up: np.ndarray) -> np.ndarray:
    """[E, H, 2I] (gate columns, then up) -> [E, 2I, H] with gate and up rows interleaved."""
    e, h, two_i = gate_up.shape
    i = two_i // 2
    interleaved = np.stack([gate_up[..., :i], gate_up[..., i:]], axis=-1).reshape(e, h, two_i)
    return np.ascontiguousarray(interleaved.transpose(0, 2, 1))


def fc2_layout(down: np.ndarray) -> np.ndarray:
    """[E, I, H] -> [E, H, I]."""
    return np.ascontiguousarray(down.transpose(0, 2, 1))


def relaid_weight(source: ir.TensorProtocol, name: str, shape: tuple[int, ...],
                  layout: Callable[[np.ndarray], np.ndarray]) -> ir.LazyTensor:
    """`layout(source)` as a lazy tensor: nothing is read or computed until it is serialized."""

    def compute() -> ir.TensorProtocol:
        return ir.tensor(layout(source.numpy()), dtype=source.dtype, name=name)

    return ir.LazyTensor(compute, dtype=source.dtype, shape=ir.Shape(shape), name=name)


def _weight(tape: ir.tape.Tape, node: ir.Node, value: ir.Value, suffix: str,
            layout: Callable[[np.ndarray], np.ndarray], shape: tuple[int, ...]) -> ir.Value:
    name = f"{value.name}{suffix}"
    existing = node.graph.initializers.get(name) if node.graph is not None else None
    if existing is not None:  # another MoE node shares these weights and was lowered already
        return existing
    return tape.initializer(relaid_weight(value.const_value, name, shape, layout), name=name)


def replacement(tape: ir.tape.Tape, node: ir.Node, prefix: str) -> list[ir.Value]:
    x, router, gate_up, down = node.inputs[:4]
    e, h, two_i = (int(d) for d in gate_up.const_value.shape)
    np_dtype = (x.dtype or gate_up.const_value.dtype).numpy()

    def op(op_type, inputs, attributes=None, name=None, **kwargs):
        return tape.op(op_type, inputs, attributes, name=f"{prefix}/{name or op_type}", **kwargs)

    logits = op("MatMul", [x, router], name="router/MatMul")  # [N, E]
    k = constant(tape, f"{prefix}/router/k", np.array([1], dtype=np.int64))
    top_value, top_index = tape.op_multi_out(
        "TopK", [logits, k], {"axis": -1}, num_outputs=2, name=f"{prefix}/router/TopK"
    )
    score = op("Sigmoid", [top_value], name="router/Sigmoid")  # [N, 1]
    routed_in = op("Mul", [x, score], name="experts/ScaleInput")  # [N, H]
    zeros = op("ConstantOfShape", [op("Shape", [logits], name="router/Shape")],
               {"value": ir.tensor(np.array([0], dtype=np_dtype))}, name="router/Zeros")
    ones = op("ConstantOfShape", [op("Shape", [top_index], name="router/IndexShape")],
              {"value": ir.tensor(np.array([1], dtype=np_dtype))}, name="router/Ones")
    one_hot = op("ScatterElements", [zeros, top_index, ones], {"axis": 1}, name="router/OneHot")  # [N, E]

    fc1 = _weight(tape, node, gate_up, FC1_SUFFIX, fc1_layout, (e, two_i, h))
    fc2 = _weight(tape, node, down, FC2_SUFFIX, fc2_layout, (e, h, two_i // 2))
    routed = op(
        "MoE", [routed_in, one_hot, fc1, None, fc2],
        {"k": 1, "activation_type": "swiglu", "swiglu_fusion": 1, "activation_alpha": 1.0,
         "activation_beta": 0.0, "normalize_routing_weights": 1, "use_sparse_mixer": 0},
        name="experts/MoE", domain=MS_DOMAIN,
    )
    if x.dtype is not None:  # ONNX shape inference does not know the contrib op: annotate its output
        routed.dtype = x.dtype
    if x.shape is not None:
        routed.shape = ir.Shape(x.shape)
    return [op("Add", [shared_expert(tape, node, prefix), routed], name="Add")]


def lower_moe_native(model: ir.Model) -> tuple[int, dict[str, str]]:
    """Replace every MoE node; returns (count, {node name: why it was not lowered}).

    The original gate_up / down initializers of lowered nodes are dropped once nothing reads them
    (their re-laid-out copies replace them; the copies read them lazily, at serialization)."""
    graph = model.graph
    relaid = {v.name: v for node in moe_nodes(model) if check(node) is None for v in node.inputs[2:4]}
    result = run_moe_lowering(model, STRATEGY, check, replacement, opset_imports={MS_DOMAIN: MS_VERSION})
    for name, value in relaid.items():
        if not value.uses() and not value.is_graph_input() and not value.is_graph_output():
            graph.initializers.pop(name, None)
    return result
