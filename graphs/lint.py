"""Static-shape lint: no tensor's shape may depend on tensor values.

Rejects ops whose output shape is value-dependent (NonZero, Unique, Compress), control flow
(Loop, If, Scan), and nodes of the project's high-level domain left unlowered.
"""

from __future__ import annotations

import onnx_ir as ir

from llama4_deploy.graphs import ops

FORBIDDEN = {"NonZero", "Unique", "Compress", "Loop", "If", "Scan"}


def lint_static(model: ir.Model) -> list[str]:
    """Problems found, one sentence each (empty when the graph is clean)."""
    problems = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain in ("", "ai.onnx") and node.op_type in FORBIDDEN:
            problems.append(f"node {node.name} is {node.op_type}, whose output shape depends on values")
        elif node.domain == ops.DOMAIN:
            problems.append(f"node {node.name} is {node.domain}.{node.op_type}, which no backend runs (not lowered)")
    return problems
