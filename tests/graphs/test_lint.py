"""The static-shape lint catches each forbidden construct and passes real bundles."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from llama4_deploy.graphs.lint import FORBIDDEN, lint_static


def _graph_with(op_type: str, domain: str = "") -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([4]))
    node = ir.Node(domain, op_type, [x], name=f"/bad/{op_type}", num_outputs=1)
    graph = ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 21, "llama4_deploy": 1})
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize("op_type", sorted(FORBIDDEN))
def test_forbidden_ops(op_type):
    problems = lint_static(_graph_with(op_type))
    assert problems == [f"node /bad/{op_type} is {op_type}, whose output shape depends on values"]


def test_unlowered_moe():
    assert "not lowered" in lint_static(_graph_with("MoE", "llama4_deploy"))[0]


def test_bundle_is_clean(tiny_bundle):
    graphs = sorted(tiny_bundle.glob("*.onnx"))
    assert graphs
    for graph in graphs:
        assert lint_static(ir.load(graph)) == []
