"""The pass base (graphs/passes.py) and what every MoE lowering shares (graphs/moe_pass.py): the count in a pass's
result, the pass table a pipeline collects, a refusal raised as its one sentence, and the router opening the four
MoE lowerings build the same way."""

from __future__ import annotations

import onnx_ir as ir
import pytest
from onnx_ir.passes.common import ClearMetadataAndDocStringPass

from llama4_deploy.graphs import dispatch, ops
from llama4_deploy.graphs.compute_dtype import ComputeDtypePass
from llama4_deploy.graphs.lower_attention import LowerAttentionPass
from llama4_deploy.graphs.lower_moe_dense import LowerMoeDensePass
from llama4_deploy.graphs.passes import LoweringError, PassPipeline, RewritePass, RewriteResult, run_passes
from llama4_deploy.graphs.quant_pass import quantize_passes
from llama4_deploy.graphs.quantize import QuantConfig, make_spec
from tests.graphs.moe_fixtures import hf_moe, moe_model

H = 32


class CountNodes(RewritePass):
    """Changes nothing; counts the graph's nodes."""

    name = "count_nodes"

    def rewrite(self, model: ir.Model) -> int:
        return len(list(model.graph))


def _moe(top_k: int = 1) -> ir.Model:
    return moe_model(hf_moe(8, H, 16)[1], H, top_k, token_valid=True)


def test_result_carries_the_count():
    model = _moe()
    result = CountNodes()(model)
    assert isinstance(result, RewriteResult) and isinstance(result, ir.passes.PassResult)
    assert (result.model, result.count, result.modified) == (model, 1, True)
    result = LowerMoeDensePass()(model)
    assert (result.count, result.modified) == (1, True)
    assert LowerMoeDensePass()(model).count == 0  # nothing left to lower
    assert LowerMoeDensePass().in_place


def test_pipeline_collects_the_pass_table_in_order():
    model = _moe()
    pipeline = PassPipeline(
        [
            ComputeDtypePass("float16"),
            CountNodes(),
            LowerMoeDensePass(),
            LowerAttentionPass("onnx23"),
            ClearMetadataAndDocStringPass(),
        ]
    )
    assert isinstance(pipeline, ir.passes.PassManager)
    result = pipeline(model)
    # six float weights and the input x re-typed; onnx-ir's own pass runs, uncounted
    assert list(result.counts.items()) == [
        ("compute_dtype_float16", 7),
        ("count_nodes", 1),
        ("lower_moe_dense", 1),
        ("lower_attention_onnx23", 0),
    ]
    assert result.model is model and result.modified


def test_nested_pipelines_merge_and_no_passes_is_an_empty_table():
    model = _moe()
    inner = PassPipeline([LowerMoeDensePass(), LowerAttentionPass("decomposed")])
    assert run_passes(model, [CountNodes(), inner]) == {
        "count_nodes": 1,
        "lower_moe_dense": 1,
        "lower_attention_decomposed": 0,
    }
    assert run_passes(model, []) == {}


def test_a_refusal_is_raised_as_its_sentence_and_changes_nothing():
    """onnx-ir's PassManager would wrap it in two PassErrors; the pipeline lets the typed error through."""
    model = _moe(top_k=9)  # more than the 8 experts
    with pytest.raises(LoweringError) as refusal:
        run_passes(model, [CountNodes(), LowerMoeDensePass()])
    assert isinstance(refusal.value, ValueError)
    assert str(refusal.value) == (
        "MoE node /layers.1/node_moe was not lowered to dense: it top_k 9 exceeds the 8 experts"
    )
    assert [(n.domain, n.op_type) for n in model.graph] == [(ops.DOMAIN, ops.MOE)]
    with pytest.raises(ir.passes.PassError):  # what the plain PassManager does with it
        ir.passes.PassManager([LowerMoeDensePass()])(model)


def test_pass_names_are_the_build_pass_table():
    int4 = make_spec(QuantConfig(precision="int4"))
    fp8 = make_spec(QuantConfig(precision="fp8"))
    assert [p.name for p in quantize_passes(int4)] == ["quantize_ort", "quantize_qdq"]
    assert [p.name for p in quantize_passes(fp8, {})] == ["quantize_qdq"]
    assert quantize_passes(make_spec(QuantConfig(precision="fp16"))) == []
    assert [dispatch.lowering(s).name for s in dispatch.STRATEGIES] == [f"lower_moe_{s}" for s in dispatch.STRATEGIES]
    assert ComputeDtypePass("bfloat16").name == "compute_dtype_bfloat16"
    assert LowerAttentionPass("onnx23").name == "lower_attention_onnx23"
    with pytest.raises(ValueError, match="unknown compute dtype 'float8'"):
        ComputeDtypePass("float8")


@pytest.mark.parametrize(
    "strategy, options",
    [
        ("dense", {}),
        ("gather", {}),
        ("gather", {"layout": "native"}),
        ("capacity", {}),
        ("native", {}),
        ("native", {"split": 2}),
    ],
)
def test_every_lowering_opens_with_the_same_router(strategy, options):
    """MatMul, the k constant and TopK, named under the strategy's scope, first in the replacement and wired alike;
    then the score: sigmoid of the top value, where the strategy scores before routing."""
    model = _moe()
    dispatch.lowering(strategy, **options)(model)
    prefix = f"/layers.1/moe/{strategy}/router/"
    nodes = list(model.graph)
    matmul, k, top_k = nodes[:3]
    assert [(n.name, n.op_type) for n in nodes[:3]] == [
        (prefix + "MatMul", "MatMul"),
        (prefix + "k", "Constant"),
        (prefix + "TopK", "TopK"),
    ]
    assert [v.name for v in matmul.inputs] == ["x", "router"]
    assert list(top_k.inputs) == [matmul.outputs[0], k.outputs[0]] and top_k.attributes["axis"].as_int() == -1
    assert k.attributes["value"].as_tensor().numpy().tolist() == [1]
    scores = [n for n in nodes if n.name == prefix + "Sigmoid"]
    if strategy in ("gather", "native"):
        assert scores[0].inputs[0] is top_k.outputs[0]
    else:  # dense scores the scattered logits; capacity scores the slots it dispatches
        assert all(n.inputs[0] is not top_k.outputs[0] for n in scores)
    assert [n.op_type for n in nodes].count("TopK") == (2 if strategy == "capacity" else 1)
