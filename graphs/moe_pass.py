"""The driver every MoE lowering shares: find candidates, check, replace, count, report overflow.

A strategy supplies `check(node) -> reason | None` and `replacement(tape, node, prefix)`
returning the new output value, or (output, overflow) for capacity-limited strategies. The
overflow flags of all layers are OR-ed into one boolean graph output, `moe_overflow` ([1]),
which tells the runtime to rerun the step on an exact engine.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir

from llama4_deploy.graphs import ops
from llama4_deploy.graphs.rewrite import layer_scope, splice
from llama4_deploy.runtime.abi import MOE_OVERFLOW

OVERFLOW_OR = "/moe_overflow/Or_"  # the combiner's nodes: Or_0 .. Or_{M-2} for M flags


def moe_nodes(model: ir.Model) -> list[ir.Node]:
    return [node for node in model.graph if node.domain == ops.DOMAIN and node.op_type == ops.MOE]


def node_prefix(node: ir.Node, strategy: str) -> str:
    """`/layers.3/node_moe` -> `/layers.3/moe/<strategy>`."""
    return layer_scope(node, f"moe/{strategy}")


def run_moe_lowering(
    model: ir.Model,
    strategy: str,
    check: Callable[[ir.Node], str | None],
    replacement: Callable[[ir.tape.Tape, ir.Node, str], list[ir.Value]],
    opset_imports: dict[str, int] | None = None,
) -> tuple[int, dict[str, str]]:
    graph = model.graph
    count, skipped, overflows = 0, {}, []
    for node in moe_nodes(model):
        reason = check(node)
        if reason is not None:
            skipped[node.name] = reason
            continue
        tape = ir.tape.Tape()
        outputs = replacement(tape, node, node_prefix(node, strategy))
        splice(graph, node, tape, outputs[0])
        overflows.extend(outputs[1:])
        count += 1
    if overflows:
        _add_overflow_output(graph, overflows)
    if not any(node.domain == ops.DOMAIN for node in graph):  # the attention op may still be there
        graph.opset_imports.pop(ops.DOMAIN, None)
    for domain, version in (opset_imports or {}).items():
        if count:
            graph.opset_imports[domain] = version
    return count, skipped


def _add_overflow_output(graph: ir.Graph, flags: list[ir.Value]) -> None:
    tape = ir.tape.Tape()
    combined = flags[0]
    for i, flag in enumerate(flags[1:]):
        combined = tape.op("Or", [combined, flag], name=f"{OVERFLOW_OR}{i}")
    if combined is flags[0]:
        combined = tape.op("Identity", [combined], name="/moe_overflow/Identity")
    graph.extend(tape.nodes)
    combined.name = MOE_OVERFLOW
    graph.outputs.append(combined)
