"""LowerAttentionPass: both forms against the op's eager semantics (export/modules.attention) on
ONNX Runtime, grouped-query heads, ragged masks and a fully masked (padded) row; structure."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from llama4_deploy.export import modules
from llama4_deploy.graphs import ops
from llama4_deploy.graphs.lower_attention import LowerAttentionPass
from llama4_deploy.graphs.passes import LoweringError

B, T, S, Q, K, D = 2, 3, 5, 4, 2, 8
SCALE = D**-0.5


def _model(shapes_known: bool = True) -> ir.Model:
    ops.register_schemas()
    f, b = ir.TensorType(ir.DataType.FLOAT), ir.TensorType(ir.DataType.BOOL)
    dims = {
        "query": ["batch", "new", Q, D],
        "key": ["batch", K, "new", D],
        "value": ["batch", K, "new", D],
        "cache_mask": ["batch", 1, 1, "new", "slots"],
        "new_mask": ["batch", 1, 1, "new", "new"],
        "past_key": ["batch", K, "slots", D],
        "past_value": ["batch", K, "slots", D],
    }
    inputs = [
        ir.Value(
            name=n,
            type=b if n.endswith("_mask") else f,
            shape=ir.Shape(dims[n] if shapes_known or n != "query" else ["batch", "new", "h", D]),
        )
        for n in ops.ATTENTION_INPUTS
    ]
    node = ir.Node(
        ops.DOMAIN,
        ops.ATTENTION,
        inputs,
        attributes=[ir.AttrFloat32("scale", SCALE)],
        name="/layers.0/node_attention",
        num_outputs=1,
    )
    out = node.outputs[0]
    out.name, out.type, out.shape = "context", f, ir.Shape(["batch", "new", Q * D])
    graph = ir.Graph(inputs, [out], nodes=[node], opset_imports={"": 21, ops.DOMAIN: ops.VERSION}, name="attention")
    return ir.Model(graph, ir_version=10)


def _feeds(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {
        "query": rng.normal(size=(B, T, Q, D)),
        "key": rng.normal(size=(B, K, T, D)),
        "value": rng.normal(size=(B, K, T, D)),
        "past_key": rng.normal(size=(B, K, S, D)),
        "past_value": rng.normal(size=(B, K, S, D)),
    }
    feeds = {k: v.astype(np.float32) for k, v in feeds.items()}
    cache_mask = rng.random((B, 1, 1, T, S)) < 0.6
    new_mask = np.tril(np.ones((T, T), dtype=bool))[None, None, None].repeat(B, 0)
    cache_mask[1, ..., 2, :] = False  # row 1's last query is padding: nothing to attend
    new_mask[1, ..., 2, :] = False
    return feeds | {"cache_mask": cache_mask, "new_mask": new_mask}


def _eager(feeds) -> np.ndarray:
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    return modules.attention(
        t["query"], t["key"], t["value"], t["cache_mask"], t["new_mask"], t["past_key"], t["past_value"], SCALE
    ).numpy()


def _run(model: ir.Model, feeds) -> np.ndarray:
    proto = ir.serde.serialize_model(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


@pytest.mark.parametrize("form", ["decomposed", "onnx23"])
def test_matches_the_op(form):
    """Only summation order differs from the eager op: observed <= 5e-7 x max|y| on these inputs;
    1e-5 x max|y| leaves a 20x margin while a wrong head grouping, mask or scale is off by O(1).
    The padded query row (nothing to attend) must stay finite."""
    feeds = _feeds()
    model = _model()
    result = LowerAttentionPass(form)(model)
    assert (result.count, result.modified) == (1, True)
    got, expected = _run(model, feeds), _eager(feeds)
    assert got.shape == (B, T, Q * D)
    assert np.isfinite(got).all()
    valid = np.ones((B, T), dtype=bool)
    valid[1, 2] = False
    np.testing.assert_allclose(got[valid], expected[valid], atol=1e-5 * np.abs(expected).max(), rtol=0)
    # the masks matter: attending everything gives other numbers
    everything = feeds | {"cache_mask": np.ones_like(feeds["cache_mask"]), "new_mask": np.ones_like(feeds["new_mask"])}
    assert np.abs(_run(model, everything)[valid] - expected[valid]).max() > 0.1


def test_structure():
    decomposed, fused = _model(), _model()
    LowerAttentionPass("decomposed")(decomposed)
    LowerAttentionPass("onnx23")(fused)
    assert not any(n.domain == ops.DOMAIN for n in decomposed.graph) and ops.DOMAIN not in decomposed.opset_imports
    assert decomposed.opset_imports[""] == 21 and "Attention" not in {n.op_type for n in decomposed.graph}
    assert all(n.name.startswith("/layers.0/attention/decomposed/") for n in decomposed.graph)
    [attention] = [n for n in fused.graph if n.op_type == "Attention"]
    assert attention.domain == "" and fused.opset_imports[""] == 23 and fused.ir_version >= 11
    assert len(list(fused.graph)) < len(list(decomposed.graph))
    assert fused.graph.outputs[0].name == "context"


def test_refusals():
    model = _model(shapes_known=False)
    with pytest.raises(LoweringError) as refusal:
        LowerAttentionPass("onnx23")(model)
    assert str(refusal.value) == (
        "attention node /layers.0/node_attention was not lowered to onnx23: it has query "
        "heads h, kv heads 2 and head size 8; expected integers with Q a multiple of K"
    )
    assert [n.op_type for n in model.graph] == [ops.ATTENTION]  # nothing changed
    with pytest.raises(ValueError, match="unknown attention form 'flash'"):
        LowerAttentionPass("flash")
