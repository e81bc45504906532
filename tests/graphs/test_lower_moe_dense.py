"""lower_moe_dense: structure (which ops remain) and numbers (ONNX Runtime vs transformers)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from llama4_deploy.graphs import ops
from llama4_deploy.graphs.lower_moe_dense import lower_moe_dense


def _moe_model(weights: dict[str, np.ndarray], hidden: int, top_k: int = 1) -> ir.Model:
    ops.register_schemas()
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["tokens", hidden]))
    inits = []
    for name in ops.MOE_INPUTS[1:-1]:
        value = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(weights[name].shape),
                         const_value=ir.tensor(weights[name], name=name))
        inits.append(value)
    node = ir.Node(ops.DOMAIN, ops.MOE, [x, *inits], attributes=[ir.AttrInt64("top_k", top_k)],
                   name="/layers.1/node_moe", num_outputs=1)
    node.outputs[0].name = "y"
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=inits, opset_imports={"": 21, ops.DOMAIN: 1})
    return ir.Model(graph, ir_version=10)


def _hf_moe(num_experts=8, hidden=32, intermediate=16, seed=0):
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    torch.manual_seed(seed)
    cfg = Llama4TextConfig(hidden_size=hidden, intermediate_size=intermediate, num_local_experts=num_experts,
                           num_experts_per_tok=1)
    moe = Llama4TextMoe(cfg).eval()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    f = moe
    weights = {
        "router": f.router.weight.T.detach().numpy().copy(),
        "gate_up": f.experts.gate_up_proj.detach().numpy().copy(),
        "down": f.experts.down_proj.detach().numpy().copy(),
        "shared_gate": f.shared_expert.gate_proj.weight.T.detach().numpy().copy(),
        "shared_up": f.shared_expert.up_proj.weight.T.detach().numpy().copy(),
        "shared_down": f.shared_expert.down_proj.weight.T.detach().numpy().copy(),
    }
    return moe, weights


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_structure_and_count():
    _, weights = _hf_moe()
    model = _moe_model(weights, hidden=32)
    count, skipped = lower_moe_dense(model)
    assert (count, skipped) == (1, {})
    op_types = [node.op_type for node in model.graph]
    assert not any(node.domain == ops.DOMAIN for node in model.graph)
    assert ops.DOMAIN not in model.opset_imports
    assert op_types.count("TopK") == 1 and op_types.count("ScatterElements") == 1
    assert all(node.name.startswith("/layers.1/moe/dense/") for node in model.graph)
    assert model.graph.outputs[0].name == "y"


def test_matches_transformers_moe():
    """fp32 both sides; only summation order differs (1e-5 relative is ~100x the observed error)."""
    moe, weights = _hf_moe()
    x = np.random.default_rng(0).normal(size=(13, 32)).astype(np.float32)
    model = _moe_model(weights, hidden=32)
    lower_moe_dense(model)
    got = _run(model, x)
    with torch.no_grad():
        expected, _ = moe(torch.from_numpy(x))
    expected = expected.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(expected).max(), rtol=0)
    # the routed part matters: without the experts the output is far off
    shared_only = (x @ weights["shared_gate"]) / (1 + np.exp(-(x @ weights["shared_gate"]))) * (x @ weights["shared_up"])
    assert np.abs(shared_only @ weights["shared_down"] - expected).max() > 0.1


def test_check_explains_skips():
    _, weights = _hf_moe()
    model = _moe_model(weights, hidden=32, top_k=9)  # more than the 8 experts
    count, skipped = lower_moe_dense(model)
    assert count == 0
    assert skipped == {"/layers.1/node_moe": "top_k 9 exceeds the 8 experts"}


@pytest.mark.parametrize("top_k", [2])
def test_top_k_above_one_matches_eager_op(top_k):
    """The op's eager semantics (export/modules.moe) and the lowering agree for k > 1 too."""
    from llama4_deploy.export.modules import moe

    _, weights = _hf_moe()
    x = np.random.default_rng(1).normal(size=(5, 32)).astype(np.float32)
    model = _moe_model(weights, hidden=32, top_k=top_k)
    lower_moe_dense(model)
    t = {k: torch.from_numpy(v) for k, v in weights.items()}
    expected = moe(torch.from_numpy(x), t["router"], t["gate_up"], t["down"], t["shared_gate"], t["shared_up"],
                   t["shared_down"], torch.ones(5, dtype=torch.bool), top_k).numpy()
    np.testing.assert_allclose(_run(model, x), expected, atol=1e-5 * np.abs(expected).max(), rtol=0)
