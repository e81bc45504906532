"""Lower `llama4_deploy.MoE` expert-major with a fixed capacity per expert (`capacity`).

    before:  y = MoE(x, router, gate_up, down, shared_gate, shared_up, shared_down, token_valid; top_k)

    after:   logits        = MatMul(x, router)                                   # [N, E]
             value, index  = TopK(logits, k)
             routed        = ScatterElements(-inf[N, E], index, value)          # -inf where unrouted
             key           = Where(token_valid, routed, -inf)                    # padding takes no slot
             C             = min(N, ceil(capacity_factor * N * k / E))           # from the input dims only
             slot_key, slot_token = TopK(Transpose(key), C)                      # [E, C]: each expert's C best tokens
             slot_score    = Where(slot_key > -inf, Sigmoid(slot_key), 0)
             expert_in     = Gather(x, slot_token) * slot_score                  # [E, C, H]
             expert_out    = MatMul(silu(gate) * up, down)                       # one batched matmul over experts
             routed_out    = ScatterND(zeros[N, H], slot_token, expert_out, reduction=add)
             y             = shared(x) + routed_out
             overflow      = ReduceMax(ReduceSum(key > -inf, axis=0)) > C        # any expert over capacity?

Why it is exact when `overflow` is false: every (token, chosen expert) pair then has a slot, so
each valid token receives exactly the sum over its chosen experts of expert(score * x), as in
the reference. Unused slots carry a zero score, hence a zero input, hence a zero output (no
biases), and add nothing where they scatter. Overflow is detected exactly: it is true iff some
expert was chosen by more valid tokens than it has slots. When it is true the runtime reruns
the step on an exact engine, so results are always exact. Padding is masked out of `key`, so
it neither takes capacity nor raises overflow.

Cost: E*C token-expert products, about capacity_factor times the routed FLOPs, and every
expert's weights read once per step.

`combine="gather"` (TensorRT's form: its parser takes ScatterND only without a reduction) replaces
the scatter-add by the inverse lookup:

             slot_of       = ScatterElements(zeros[E, N], slot_token, Range(C), axis=1)   # [E, N]
             slot          = GatherElements(Transpose(slot_of), index, axis=1)           # [N, k]
             flat          = index * C + slot
             hit           = Gather(slot_token, flat) == n  and  Gather(slot_used, flat)  # [N, k]
             routed_out    = ReduceSum(Where(hit, Gather(expert_out, flat), 0), axis=1)

Why it is the same sum: TopK returns distinct tokens per expert row, so slot_of has no duplicate
writes and slot_of[e, n] is the slot of token n in expert e whenever it has one; `hit` is true
exactly for the (token, choice) pairs that hold a used slot, the pairs the scatter-add adds. A
pair without a slot (overflow: the step is rerun anyway) reads some other slot and `hit` drops it.
With k = 1 (Llama 4) each token adds one value to zero in both forms: the same bits.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from llama4_deploy.graphs.lower_moe_dense import check as check_dense
from llama4_deploy.graphs.lower_moe_dense import shared_expert, stacked_experts
from llama4_deploy.graphs.moe_pass import MoeLoweringPass, route
from llama4_deploy.graphs.rewrite import scoped

STRATEGY = "capacity"


@dataclasses.dataclass(frozen=True, kw_only=True)
class CapacityConfig:
    capacity_factor: float = 1.25
    combine: str = "scatter_add"  # or "gather": no ScatterND reduction (TensorRT)

    def __post_init__(self):
        if not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor is {self.capacity_factor}; it must be positive")
        if self.combine not in COMBINES:
            raise ValueError(f"combine is {self.combine!r}; expected one of {', '.join(COMBINES)}")


COMBINES = ("scatter_add", "gather")


def _combine_gather(op, const, x, top_index, slot_token, slot_used, capacity, expert_out, zero):
    """routed_out [N, H] by looking each (token, choice) up in its expert's slots (module docstring)."""
    int_zero = const("combine/int_zero", np.array(0, dtype=np.int64))
    one = const("combine/one", np.array(1, dtype=np.int64))
    first = const("combine/axis0", np.array([0], dtype=np.int64))
    c = op("Squeeze", [capacity, first], name="combine/C")  # scalar
    slot_ids = op(
        "Expand",
        [op("Range", [int_zero, c, one], name="combine/Slots"), op("Shape", [slot_token], name="combine/SlotShape")],
        name="combine/SlotIds",
    )  # [E, C]
    key_shape = op(
        "Concat",
        [
            op("Shape", [slot_token], {"start": 0, "end": 1}, name="combine/E"),
            op("Shape", [x], {"start": 0, "end": 1}, name="combine/N"),
        ],
        {"axis": 0},
        name="combine/KeyShape",
    )
    slot_of = op(
        "ScatterElements",
        [op("Expand", [int_zero, key_shape], name="combine/Zeros"), slot_token, slot_ids],
        {"axis": 1},
        name="combine/SlotOf",
    )  # [E, N]
    slot = op(
        "GatherElements",
        [op("Transpose", [slot_of], {"perm": [1, 0]}, name="combine/TokenMajor"), top_index],
        {"axis": 1},
        name="combine/Slot",
    )  # [N, k]
    flat = op("Add", [op("Mul", [top_index, c], name="combine/ExpertBase"), slot], name="combine/Flat")
    flat_shape = const("combine/flat_shape", np.array([-1], dtype=np.int64))
    owner = op(
        "Gather",
        [op("Reshape", [slot_token, flat_shape], name="combine/TokensFlat"), flat],
        {"axis": 0},
        name="combine/Owner",
    )  # [N, k]
    used = op(
        "Gather",
        [op("Reshape", [slot_used, flat_shape], name="combine/UsedFlat"), flat],
        {"axis": 0},
        name="combine/Used",
    )
    tokens = op(
        "Unsqueeze",
        [
            op(
                "Range",
                [
                    int_zero,
                    op(
                        "Squeeze",
                        [op("Shape", [x], {"start": 0, "end": 1}, name="combine/N2"), first],
                        name="combine/NScalar",
                    ),
                    one,
                ],
                name="combine/TokenIds",
            ),
            const("combine/axis_last", np.array([-1], dtype=np.int64)),
        ],
        name="combine/TokenColumn",
    )
    hit = op("And", [op("Equal", [owner, tokens], name="combine/Owned"), used], name="combine/Hit")  # [N, k]
    rows = op(
        "Reshape",
        [
            expert_out,
            op(
                "Concat",
                [flat_shape, op("Shape", [x], {"start": 1, "end": 2}, name="combine/H")],
                {"axis": 0},
                name="combine/RowsShape",
            ),
        ],
        name="combine/Rows",
    )  # [E*C, H]
    picked = op("Gather", [rows, flat], {"axis": 0}, name="combine/Pick")  # [N, k, H]
    kept = op(
        "Where",
        [
            op(
                "Unsqueeze",
                [hit, const("combine/axis_last2", np.array([-1], dtype=np.int64))],
                name="combine/HitColumn",
            ),
            picked,
            zero,
        ],
        name="combine/Kept",
    )
    return op(
        "ReduceSum",
        [kept, const("combine/sum_axis", np.array([1], dtype=np.int64))],
        {"keepdims": 0},
        name="combine/Sum",
    )


def check(node: ir.Node) -> str | None:
    reason = check_dense(node)
    if reason is None and len(node.inputs) < 8:
        return "has no token_valid input, so padding could take capacity"
    if reason is None and not (node.inputs[1].shape and isinstance(node.inputs[1].shape[-1], int)):
        return "has a router whose expert count is not static"
    return reason


def replacement(tape: ir.tape.Tape, node: ir.Node, prefix: str, config: CapacityConfig) -> list[ir.Value]:
    x, gate_up, down = node.inputs[0], *node.inputs[2:4]
    token_valid = node.inputs[7]
    top_k = node.attributes["top_k"].as_int()
    num_experts = node.inputs[1].shape[-1]
    np_dtype = (x.dtype or ir.DataType.FLOAT).numpy()

    op, const = scoped(tape, prefix)

    logits, top_value, top_index = route(op, const, node)
    neg_inf = const("neg_inf", np.array(-np.inf, dtype=np_dtype))
    floor = op("Expand", [neg_inf, op("Shape", [logits], name="router/Shape")], name="router/NegInf")
    routed = op("ScatterElements", [floor, top_index, top_value], {"axis": 1}, name="router/ScatterElements")
    valid = op(
        "Unsqueeze", [token_valid, const("axis_last", np.array([-1], dtype=np.int64))], name="dispatch/ValidColumn"
    )  # [N, 1]
    key = op(
        "Transpose",
        [op("Where", [valid, routed, neg_inf], name="dispatch/MaskPadding")],
        {"perm": [1, 0]},
        name="dispatch/ExpertMajor",
    )  # [E, N]
    # capacity from the token count (an input dimension), never from routing values
    tokens = op("Shape", [x], {"start": 0, "end": 1}, name="dispatch/Tokens")  # [1]
    scaled = op(
        "Mul",
        [
            op("Cast", [tokens], {"to": ir.DataType.FLOAT}, name="dispatch/TokensF"),
            const("capacity_per_token", np.array(config.capacity_factor * top_k / num_experts, dtype=np.float32)),
        ],
        name="dispatch/Scale",
    )
    capacity = op(
        "Min",
        [
            op(
                "Cast",
                [op("Ceil", [scaled], name="dispatch/Ceil")],
                {"to": ir.DataType.INT64},
                name="dispatch/CapacityInt",
            ),
            tokens,
        ],
        name="dispatch/Capacity",
    )  # [1]
    slot_key, slot_token = op("TopK", [key, capacity], {"axis": -1}, name="dispatch/TopK", num_outputs=2)  # [E, C]
    slot_used = op("Greater", [slot_key, neg_inf], name="dispatch/SlotUsed")
    zero = const("zero", np.array(0, dtype=np_dtype))
    slot_score = op(
        "Where", [slot_used, op("Sigmoid", [slot_key], name="dispatch/Sigmoid"), zero], name="dispatch/SlotScore"
    )
    expert_in = op(
        "Mul",
        [
            op("Gather", [x, slot_token], {"axis": 0}, name="dispatch/GatherTokens"),
            op(
                "Unsqueeze",
                [slot_score, const("axis_last2", np.array([-1], dtype=np.int64))],
                name="dispatch/ScoreColumn",
            ),
        ],
        name="dispatch/ScaleInput",
    )  # [E, C, H]
    expert_out = stacked_experts(tape, op, expert_in, gate_up, down, prefix)  # [E, C, H]
    if config.combine == "gather":
        combined = _combine_gather(op, const, x, top_index, slot_token, slot_used, capacity, expert_out, zero)
    else:
        combined = op(
            "ScatterND",
            [
                op("Expand", [zero, op("Shape", [x], name="combine/Shape")], name="combine/Zeros"),
                op(
                    "Unsqueeze", [slot_token, const("axis_last3", np.array([-1], dtype=np.int64))], name="combine/Index"
                ),
                expert_out,
            ],
            {"reduction": "add"},
            name="combine/ScatterAdd",
        )
    load = op(
        "ReduceSum",
        [
            op(
                "Cast",
                [op("Greater", [key, neg_inf], name="overflow/Routed")],
                {"to": ir.DataType.FLOAT},
                name="overflow/RoutedF",
            ),
            const("axis1", np.array([1], dtype=np.int64)),
        ],
        {"keepdims": 0},
        name="overflow/Load",
    )  # [E] valid tokens per expert
    peak = op(
        "ReduceMax", [load, const("axis0", np.array([0], dtype=np.int64))], {"keepdims": 1}, name="overflow/Peak"
    )  # [1]
    overflow = op(
        "Greater",
        [peak, op("Cast", [capacity], {"to": ir.DataType.FLOAT}, name="overflow/CapacityF")],
        name="overflow/Greater",
    )
    return [op("Add", [shared_expert(tape, node, prefix), combined], name="Add"), overflow]


class LowerMoeCapacityPass(MoeLoweringPass):
    """Replace every MoE node by the capacity form and add the `moe_overflow` graph output; raises LoweringError
    for one `check` refuses."""

    strategy = STRATEGY

    def __init__(self, config: CapacityConfig = CapacityConfig()):
        self.config = config

    def check(self, node: ir.Node) -> str | None:
        return check(node)

    def replacement(self, tape: ir.tape.Tape, node: ir.Node, prefix: str) -> list[ir.Value]:
        return replacement(tape, node, prefix, self.config)
