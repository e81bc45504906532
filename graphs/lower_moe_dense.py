"""Lower `llama4_deploy.MoE` to standard ONNX: every expert on every token (`dense`).

    before:  y = MoE(x, router, gate_up, down, shared_gate, shared_up, shared_down; top_k)

    after:   logits        = MatMul(x, router)                         # [N, E]
             value, index  = TopK(logits, top_k)                       # [N, k]
             score         = Sigmoid(ScatterElements(-inf[N, E], index, value, axis=1))
             routed_in     = Unsqueeze(Transpose(score), -1) * x       # [E, N, H]
             gate, up      = Split(MatMul(routed_in, gate_up), 2, axis=-1)
             routed        = ReduceSum(MatMul(silu(gate) * up, down), axis=0)
             y             = shared(x) + routed

Why it is exact: sigmoid(-inf) is exactly 0, so an unrouted expert receives the zero vector, and
an expert of Llama 4 maps zero to zero (no biases, silu(0) * 0 = 0). Summing every expert's
output therefore equals summing the routed ones. Shapes depend only on N (input dimension) and
the weights, never on which experts were chosen. Cost: E/k times the routed FLOPs.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from llama4_deploy.graphs import ops
from llama4_deploy.graphs.moe_pass import MoeLoweringPass, route
from llama4_deploy.graphs.rewrite import scoped

STRATEGY = "dense"


def check(node: ir.Node) -> str | None:
    """Why `node` cannot be lowered, or None."""
    if len(node.inputs) not in (len(ops.MOE_INPUTS) - 1, len(ops.MOE_INPUTS)) or any(v is None for v in node.inputs):
        return f"has {len(node.inputs)} inputs, expected {len(ops.MOE_INPUTS)}"
    top_k = node.attributes.get("top_k")
    if top_k is None or top_k.as_int() < 1:
        return "has no positive top_k attribute"
    router_shape = node.inputs[1].shape
    if router_shape is not None and isinstance(router_shape[-1], int) and top_k.as_int() > router_shape[-1]:
        return f"top_k {top_k.as_int()} exceeds the {router_shape[-1]} experts"
    return None


def silu(tape: ir.tape.Tape, x: ir.Value, name: str) -> ir.Value:
    return tape.op("Mul", [x, tape.op("Sigmoid", [x], name=f"{name}/Sigmoid")], name=f"{name}/Mul")


def shared_expert(tape: ir.tape.Tape, node: ir.Node, prefix: str) -> ir.Value:
    """The shared expert on every token: (silu(x @ gate) * (x @ up)) @ down."""
    x, shared_gate, shared_up, shared_down = node.inputs[0], *node.inputs[4:7]
    gate = tape.op("MatMul", [x, shared_gate], name=f"{prefix}/shared/Gate")
    up = tape.op("MatMul", [x, shared_up], name=f"{prefix}/shared/Up")
    glu = tape.op("Mul", [silu(tape, gate, f"{prefix}/shared/silu"), up], name=f"{prefix}/shared/GLU")
    return tape.op("MatMul", [glu, shared_down], name=f"{prefix}/shared/Down")


def stacked_experts(tape: ir.tape.Tape, op, rows: ir.Value, gate_up: ir.Value, down: ir.Value, prefix: str) -> ir.Value:
    """Each expert's SwiGLU on its own rows, batched over the expert stack: `rows` [E, R, H] -> [E, R, H]."""
    both = op("MatMul", [rows, gate_up], name="experts/GateUp")
    gate, up = op("Split", [both], {"axis": -1, "num_outputs": 2}, name="experts/Split", num_outputs=2)
    glu = op("Mul", [silu(tape, gate, f"{prefix}/experts/silu"), up], name="experts/GLU")
    return op("MatMul", [glu, down], name="experts/Down")


def replacement(tape: ir.tape.Tape, node: ir.Node, prefix: str) -> list[ir.Value]:
    x, gate_up, down = node.inputs[0], *node.inputs[2:4]
    np_dtype = (x.dtype or ir.DataType.FLOAT).numpy()

    op, const = scoped(tape, prefix)

    logits, top_value, top_index = route(op, const, node)
    floor = op(
        "ConstantOfShape",
        [op("Shape", [logits], name="router/Shape")],
        {"value": ir.tensor(np.array([-np.inf], dtype=np_dtype))},
        name="router/NegInf",
    )
    scattered = op("ScatterElements", [floor, top_index, top_value], {"axis": 1}, name="router/ScatterElements")
    score = op("Sigmoid", [scattered], name="router/Sigmoid")  # [N, E], 0 where unrouted
    expert_score = op(
        "Unsqueeze", [op("Transpose", [score], {"perm": [1, 0]}), const("axis_last", np.array([-1], dtype=np.int64))]
    )
    routed_in = op("Mul", [expert_score, x], name="experts/ScaleInput")  # [E, N, H]
    expert_out = stacked_experts(tape, op, routed_in, gate_up, down, prefix)  # [E, N, H]
    routed = op(
        "ReduceSum", [expert_out, const("axis0", np.array([0], dtype=np.int64))], {"keepdims": 0}, name="experts/Sum"
    )
    return [op("Add", [shared_expert(tape, node, prefix), routed], name="Add")]


class LowerMoeDensePass(MoeLoweringPass):
    """Replace every MoE node by the dense form; raises LoweringError for one `check` refuses."""

    strategy = STRATEGY

    def check(self, node: ir.Node) -> str | None:
        return check(node)

    def replacement(self, tape: ir.tape.Tape, node: ir.Node, prefix: str) -> list[ir.Value]:
        return replacement(tape, node, prefix)
