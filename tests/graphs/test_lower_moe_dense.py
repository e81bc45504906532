"""LowerMoeDensePass: structure (which ops remain) and numbers (ONNX Runtime vs transformers)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from llama4_deploy.graphs import ops
from llama4_deploy.graphs.lower_moe_dense import LowerMoeDensePass
from llama4_deploy.graphs.passes import LoweringError
from tests.graphs.moe_fixtures import assert_close_fp32, hf_moe, moe_model, run_ort, transformers_output


def _hf_moe(num_experts=8, hidden=32, intermediate=16, seed=0):
    return hf_moe(num_experts, hidden, intermediate, seed)


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    return run_ort(model, x=x)["y"]


def test_structure_and_count():
    _, weights = _hf_moe()
    model = moe_model(weights, hidden=32)
    result = LowerMoeDensePass()(model)
    assert (result.count, result.modified, result.model) == (1, True, model)
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
    model = moe_model(weights, hidden=32)
    LowerMoeDensePass()(model)
    expected = transformers_output(moe, x)
    assert_close_fp32(_run(model, x), expected)
    # the routed part matters: without the experts the output is far off
    shared_only = (
        (x @ weights["shared_gate"]) / (1 + np.exp(-(x @ weights["shared_gate"]))) * (x @ weights["shared_up"])
    )
    assert np.abs(shared_only @ weights["shared_down"] - expected).max() > 0.1


def test_refusal_names_the_node_and_why():
    _, weights = _hf_moe()
    model = moe_model(weights, hidden=32, top_k=9)  # more than the 8 experts
    with pytest.raises(LoweringError) as refusal:
        LowerMoeDensePass()(model)
    assert str(refusal.value) == (
        "MoE node /layers.1/node_moe was not lowered to dense: it top_k 9 exceeds the 8 experts"
    )
    assert [n.op_type for n in model.graph] == [ops.MOE]


@pytest.mark.parametrize("top_k", [2])
def test_top_k_above_one_matches_eager_op(top_k):
    """The op's eager semantics (export/modules.moe) and the lowering agree for k > 1 too."""
    from llama4_deploy.export.modules import moe

    _, weights = _hf_moe()
    x = np.random.default_rng(1).normal(size=(5, 32)).astype(np.float32)
    model = moe_model(weights, hidden=32, top_k=top_k)
    LowerMoeDensePass()(model)
    t = {k: torch.from_numpy(v) for k, v in weights.items()}
    expected = moe(
        torch.from_numpy(x),
        t["router"],
        t["gate_up"],
        t["down"],
        t["shared_gate"],
        t["shared_up"],
        t["shared_down"],
        torch.ones(5, dtype=torch.bool),
        top_k,
    ).numpy()
    np.testing.assert_allclose(_run(model, x), expected, atol=1e-5 * np.abs(expected).max(), rtol=0)
