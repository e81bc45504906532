"""Lower `llama4_deploy.MoE` by gathering each token's chosen experts' weights (`gather`).

    before:  y = MoE(x, router, gate_up, down, shared_gate, shared_up, shared_down; top_k)

    after:   logits        = MatMul(x, router)                         # [N, E]
             value, index  = TopK(logits, k)                           # [N, k]
             routed_in     = Unsqueeze(x, 1) * Unsqueeze(Sigmoid(value), -1)    # [N, k, H]
             w1            = Gather(gate_up, index)                    # [N, k, H, 2I]  weight copy
             gate, up      = Split(MatMul(Unsqueeze(routed_in, 2), w1), 2, axis=-1)   # [N, k, 1, I]
             w2            = Gather(down, index)                       # [N, k, I, H]   weight copy
             routed        = ReduceSum(Squeeze(MatMul(silu(gate) * up, w2), 2), axis=1)
             y             = shared(x) + routed

Why it is exact: it computes the same sum as the reference, restricted to the k experts each
token chose; the other experts contribute exactly zero there (see lower_moe_dense.py). Scaling
the input before the gather commutes with it, since the score is per (token, choice). Shapes
depend on N and k only. Cost: the routed FLOPs exactly, but N*k expert weight slices are
copied per step, which pays off only for few tokens (decode).

`layout="native"`: the same sum on the native lowering's re-laid-out weights (lower_moe_native.py), so a
bundle whose prefill graph is `native` and decode graph `gather` stores the experts once, not in two
layouts. Each expert is P parts (virtual expert p*E + e holds units p*Ip..(p+1)*Ip of expert e), fc1
[P*E, 2Ip, H] with gate and up rows interleaved, fc2 [P*E, H, Ip] scaled by P:

             parts         = Unsqueeze(index, -1) + [0, E, .., (P-1)E]       # [N, k, P]
             w1            = Gather(fc1, parts)                        # [N, k, P, 2Ip, H]  weight copy
             hidden        = MatMul(w1, Unsqueeze(routed_in, (2, 4)))  # [N, k, P, 2Ip, 1]  weight on the left
             gate, up      = Slice(hidden, 0::2), Slice(hidden, 1::2)  # rows 2i, 2i+1, axis -2
             w2            = Gather(fc2, parts)                        # [N, k, P, H, Ip]
             routed        = ReduceSum(MatMul(w2, silu(gate) * up), axes (1, 2, 4)) * (1/P)

Why it is exact: part p's rows are expert e's gate and up units p*Ip + i, so the parts' down products
add up to the expert's (the SwiGLU expert is a sum over its units); fc2 carries a factor P, a power of
two, which 1/P removes exactly. Only the summation order of the parts differs from one GEMM, as in the
native op. The weight is the MatMul's left operand, contracted along its last axis, so nothing is
transposed at run time.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from llama4_deploy.graphs.lower_moe_dense import check, shared_expert, silu
from llama4_deploy.graphs.lower_moe_native import check as check_native
from llama4_deploy.graphs.lower_moe_native import native_weights
from llama4_deploy.graphs.moe_pass import MoeLoweringPass, route, top_score
from llama4_deploy.graphs.rewrite import scoped

STRATEGY = "gather"
LAYOUTS = ("matmul", "native")


def _routed_inputs(op, axes, node: ir.Node, top_value: ir.Value) -> ir.Value:
    """Each token's input scaled by the score of each of its k chosen experts [N, k, H]."""
    score = op("Unsqueeze", [top_score(op, top_value), axes("axis_last", -1)])  # [N, k, 1]
    return op(
        "Mul",
        [op("Unsqueeze", [node.inputs[0], axes("axis1", 1)], name="experts/UnsqueezeX"), score],
        name="experts/ScaleInput",
    )  # [N, k, H]


def replacement(tape: ir.tape.Tape, node: ir.Node, prefix: str) -> list[ir.Value]:
    gate_up, down = node.inputs[2:4]

    op, const = scoped(tape, prefix)

    def axes(name, *values):
        return const(name, np.array(values, dtype=np.int64))

    _, top_value, top_index = route(op, const, node)
    routed_in = _routed_inputs(op, axes, node, top_value)
    w1 = op("Gather", [gate_up, top_index], {"axis": 0}, name="experts/GatherGateUp")  # [N, k, H, 2I]
    hidden = op(
        "MatMul",
        [op("Unsqueeze", [routed_in, axes("axis2", 2)], name="experts/UnsqueezeIn"), w1],
        name="experts/GateUp",
    )  # [N, k, 1, 2I]
    gate, up = op("Split", [hidden], {"axis": -1, "num_outputs": 2}, name="experts/Split", num_outputs=2)
    w2 = op("Gather", [down, top_index], {"axis": 0}, name="experts/GatherDown")  # [N, k, I, H]
    expert_out = op(
        "MatMul",
        [op("Mul", [silu(tape, gate, f"{prefix}/experts/silu"), up], name="experts/GLU"), w2],
        name="experts/Down",
    )  # [N, k, 1, H]
    routed = op(
        "ReduceSum",
        [op("Squeeze", [expert_out, axes("squeeze_axis", 2)], name="experts/Squeeze"), axes("sum_axis", 1)],
        {"keepdims": 0},
        name="experts/Sum",
    )
    return [op("Add", [shared_expert(tape, node, prefix), routed], name="Add")]


def native_layout_replacement(
    tape: ir.tape.Tape, node: ir.Node, prefix: str, split: int | None = None
) -> list[ir.Value]:
    x = node.inputs[0]
    experts = int(node.inputs[2].const_value.shape[0])
    fc1, fc2, p = native_weights(tape, node, split)
    np_dtype = (x.dtype or node.inputs[2].const_value.dtype).numpy()

    op, const = scoped(tape, prefix)

    def axes(name, *values):
        return const(name, np.array(values, dtype=np.int64))

    _, top_value, top_index = route(op, const, node)
    routed_in = _routed_inputs(op, axes, node, top_value)
    picked = op("Unsqueeze", [top_index, axes("axis_parts", -1)], name="experts/UnsqueezeIndex")  # [N, k, 1]
    if p > 1:
        picked = op(
            "Add", [picked, axes("part_offsets", *(q * experts for q in range(p)))], name="experts/Parts"
        )  # [N, k, P]: virtual experts q*E + e
    w1 = op("Gather", [fc1, picked], {"axis": 0}, name="experts/GatherGateUp")  # [N, k, P, 2Ip, H]
    column = op("Unsqueeze", [routed_in, axes("axes_column", 2, 4)], name="experts/UnsqueezeIn")  # [N, k, 1, H, 1]
    hidden = op("MatMul", [w1, column], name="experts/GateUp")  # [N, k, P, 2Ip, 1], rows [g0, u0, g1, u1, ..]
    rows = int(fc1.shape[1])

    def every_second(first: int, name: str) -> ir.Value:
        return op(
            "Slice",
            [
                hidden,
                axes(f"{name}/start", first),
                axes(f"{name}/end", rows),
                axes("rows_axis", -2),
                axes("rows_step", 2),
            ],
            name=f"experts/{name}",
        )

    gate, up = every_second(0, "Gate"), every_second(1, "Up")  # [N, k, P, Ip, 1]
    w2 = op("Gather", [fc2, picked], {"axis": 0}, name="experts/GatherDown")  # [N, k, P, H, Ip]
    expert_out = op(
        "MatMul",
        [w2, op("Mul", [silu(tape, gate, f"{prefix}/experts/silu"), up], name="experts/GLU")],
        name="experts/Down",
    )  # [N, k, P, H, 1]
    routed = op("ReduceSum", [expert_out, axes("sum_axes", 1, 2, 4)], {"keepdims": 0}, name="experts/Sum")  # [N, H]
    if p > 1:  # fc2 holds P * down (lower_moe_native.fc2_layout): exact for a power of two
        routed = op(
            "Mul", [routed, const("experts/inverse_parts", np.array(1.0 / p, dtype=np_dtype))], name="experts/Unscale"
        )
    return [op("Add", [shared_expert(tape, node, prefix), routed], name="Add")]


class LowerMoeGatherPass(MoeLoweringPass):
    """Replace every MoE node by the gather form; raises LoweringError for one `check` refuses. `layout` "native"
    gathers from the native lowering's re-laid-out weights (same names and bytes, `split` parts as it would
    choose) and drops the original expert initializers once nothing reads them."""

    strategy = STRATEGY

    def __init__(self, layout: str = "matmul", split: int | None = None):
        if layout not in LAYOUTS:
            raise ValueError(f"unknown gather layout {layout!r}; choose matmul or native")
        self.layout, self.split = layout, split
        self.relays_weights = layout == "native"

    def check(self, node: ir.Node) -> str | None:
        if self.layout == "matmul":
            return check(node)
        return check(node) or check_native(node, any_top_k=True, split=self.split)

    def replacement(self, tape: ir.tape.Tape, node: ir.Node, prefix: str) -> list[ir.Value]:
        if self.layout == "matmul":
            return replacement(tape, node, prefix)
        return native_layout_replacement(tape, node, prefix, self.split)
