"""What every MoE lowering shares: the pass that finds candidates, checks, replaces, counts and reports
overflow, and the router opening each replacement starts with.

A strategy supplies `check(node) -> reason | None` and `replacement(tape, node, prefix)` returning the new
output value, or (output, overflow) for capacity-limited strategies. Every MoE node is checked before any is
replaced: one that cannot be lowered raises LoweringError and leaves the model as it was. The overflow flags of
all layers are OR-ed into one boolean graph output, `moe_overflow` ([1]), which tells the runtime to rerun the
step on an exact engine.

The router opening (`route`), identical in every strategy:

    logits        = MatMul(x, router)                     # [N, E]   /router/MatMul
    value, index  = TopK(logits, k)                       # [N, k]   /router/TopK, k from /router/k
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping

import numpy as np
import onnx_ir as ir

from llama4_deploy.graphs import ops
from llama4_deploy.graphs.passes import LoweringError, RewritePass
from llama4_deploy.graphs.rewrite import layer_scope, splice
from llama4_deploy.runtime.abi import MOE_OVERFLOW

OVERFLOW_OR = "/moe_overflow/Or_"  # the combiner's nodes: Or_0 .. Or_{M-2} for M flags


def moe_nodes(model: ir.Model) -> list[ir.Node]:
    return [node for node in model.graph if node.domain == ops.DOMAIN and node.op_type == ops.MOE]


def node_prefix(node: ir.Node, strategy: str) -> str:
    """`/layers.3/node_moe` -> `/layers.3/moe/<strategy>`."""
    return layer_scope(node, f"moe/{strategy}")


def route(
    op: Callable[..., ir.Value], const: Callable[[str, object], ir.Value], node: ir.Node
) -> tuple[ir.Value, ir.Value, ir.Value]:
    """(logits [N, E], top value [N, k], top index [N, k]) of `node`'s router, built with `scoped` builders."""
    x, router = node.inputs[:2]
    top_k = node.attributes["top_k"].as_int()
    logits = op("MatMul", [x, router], name="router/MatMul")
    top_value, top_index = op(
        "TopK",
        [logits, const("router/k", np.array([top_k], dtype=np.int64))],
        {"axis": -1},
        name="router/TopK",
        num_outputs=2,
    )
    return logits, top_value, top_index


def top_score(op: Callable[..., ir.Value], top_value: ir.Value) -> ir.Value:
    """Llama 4's score of each chosen expert, sigmoid of its logit [N, k] (strategies that score before routing)."""
    return op("Sigmoid", [top_value], name="router/Sigmoid")


class MoeLoweringPass(RewritePass):
    """Replace every `llama4_deploy.MoE` node by `replacement`; raises LoweringError naming the first node `check`
    refuses. `relays_weights`: the replacement reads re-laid-out copies of the expert weights (inputs 2 and 3),
    so the originals are dropped once nothing reads them."""

    strategy: str
    opset_imports: Mapping[str, int] = {}  # added to the graph's when a node was lowered
    relays_weights = False

    @property
    def name(self) -> str:
        return f"lower_moe_{self.strategy}"

    @abc.abstractmethod
    def check(self, node: ir.Node) -> str | None:
        """Why `node` cannot be lowered, or None."""

    @abc.abstractmethod
    def replacement(self, tape: ir.tape.Tape, node: ir.Node, prefix: str) -> list[ir.Value]: ...

    def rewrite(self, model: ir.Model) -> int:
        graph = model.graph
        nodes = moe_nodes(model)
        for node in nodes:
            reason = self.check(node)
            if reason is not None:
                raise LoweringError(f"MoE node {node.name} was not lowered to {self.strategy}: it {reason}")
        originals = {v.name: v for node in nodes for v in node.inputs[2:4]} if self.relays_weights else {}
        overflows = []
        for node in nodes:
            tape = ir.tape.Tape()
            outputs = self.replacement(tape, node, node_prefix(node, self.strategy))
            splice(graph, node, tape, outputs[0])
            overflows.extend(outputs[1:])
        if overflows:
            _add_overflow_output(graph, overflows)
        if not any(node.domain == ops.DOMAIN for node in graph):  # the attention op may still be there
            graph.opset_imports.pop(ops.DOMAIN, None)
        if nodes:
            graph.opset_imports.update(self.opset_imports)
        for name, value in originals.items():
            if not value.uses() and not value.is_graph_input() and not value.is_graph_output():
                graph.initializers.pop(name, None)
        return len(nodes)


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
