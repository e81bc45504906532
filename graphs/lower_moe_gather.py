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
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from llama4_deploy.graphs.lower_moe_dense import check, shared_expert, silu
from llama4_deploy.graphs.moe_pass import run_moe_lowering
from llama4_deploy.graphs.rewrite import scoped

STRATEGY = "gather"


def replacement(tape: ir.tape.Tape, node: ir.Node, prefix: str) -> list[ir.Value]:
    x, router, gate_up, down = node.inputs[:4]
    top_k = node.attributes["top_k"].as_int()

    op, const = scoped(tape, prefix)

    def axes(name, *values):
        return const(name, np.array(values, dtype=np.int64))

    logits = op("MatMul", [x, router], name="router/MatMul")
    top_value, top_index = op("TopK", [logits, axes("router/k", top_k)], {"axis": -1}, name="router/TopK",
                              num_outputs=2)
    score = op("Unsqueeze", [op("Sigmoid", [top_value], name="router/Sigmoid"), axes("axis_last", -1)])  # [N, k, 1]
    routed_in = op("Mul", [op("Unsqueeze", [x, axes("axis1", 1)], name="experts/UnsqueezeX"), score],
                   name="experts/ScaleInput")  # [N, k, H]
    w1 = op("Gather", [gate_up, top_index], {"axis": 0}, name="experts/GatherGateUp")  # [N, k, H, 2I]
    hidden = op("MatMul", [op("Unsqueeze", [routed_in, axes("axis2", 2)], name="experts/UnsqueezeIn"), w1],
                name="experts/GateUp")  # [N, k, 1, 2I]
    gate, up = op("Split", [hidden], {"axis": -1, "num_outputs": 2}, name="experts/Split", num_outputs=2)
    w2 = op("Gather", [down, top_index], {"axis": 0}, name="experts/GatherDown")  # [N, k, I, H]
    expert_out = op("MatMul", [op("Mul", [silu(tape, gate, f"{prefix}/experts/silu"), up], name="experts/GLU"), w2],
                    name="experts/Down")  # [N, k, 1, H]
    routed = op("ReduceSum", [op("Squeeze", [expert_out, axes("squeeze_axis", 2)], name="experts/Squeeze"),
                              axes("sum_axis", 1)], {"keepdims": 0}, name="experts/Sum")
    return [op("Add", [shared_expert(tape, node, prefix), routed], name="Add")]


def lower_moe_gather(model: ir.Model) -> tuple[int, dict[str, str]]:
    """Replace every MoE node; returns (count, {node name: why it was not lowered})."""
    return run_moe_lowering(model, STRATEGY, check, replacement)
