"""What every lowering pass shares: builders that name new nodes under a layer's scope, and the
splice that puts a replacement subgraph where a high-level node was."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir


def constant(tape: ir.tape.Tape, name: str, array: np.ndarray) -> ir.Value:
    return tape.op("Constant", [], {"value": ir.tensor(array, name=name)}, name=name)


def layer_scope(node: ir.Node, scope: str) -> str:
    """`/layers.3/node_moe`, `moe/native` -> `/layers.3/moe/native`."""
    layer = node.name.rsplit("/", 1)[0] if node.name and "/" in node.name else ""
    return f"{layer}/{scope}"


def scoped(tape: ir.tape.Tape, prefix: str) -> tuple[Callable[..., ir.Value], Callable[[str, object], ir.Value]]:
    """(op, const): `op(type, inputs, attributes, name=..., num_outputs=..., domain=...)` and
    `const(name, array)` add nodes to `tape` named `<prefix>/<name>`; with num_outputs, op
    returns that many values."""

    def op(op_type, inputs, attributes=None, name=None, num_outputs=None, **kwargs):
        full = f"{prefix}/{name or op_type}"
        if num_outputs is not None:
            return tape.op_multi_out(op_type, inputs, attributes, num_outputs=num_outputs, name=full, **kwargs)
        return tape.op(op_type, inputs, attributes, name=full, **kwargs)

    def const(name, array):
        return constant(tape, f"{prefix}/{name}", np.asarray(array))

    return op, const


def splice(graph: ir.Graph, node: ir.Node, tape: ir.tape.Tape, output: ir.Value) -> None:
    """Insert `tape`'s nodes and initializers before `node`, hand `node`'s single output (its
    name and every use, graph outputs included) to `output`, and remove `node`."""
    graph.insert_before(node, tape.nodes)
    for initializer in tape.initializers:
        graph.register_initializer(initializer)
    old = node.outputs[0]
    name, old.name = old.name, None
    ir.convenience.replace_all_uses_with(old, output, replace_graph_outputs=True)
    output.name = name
    graph.remove(node, safe=True)
