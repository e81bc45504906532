"""graphs/lint_tensorrt.py: one hand-made graph per rule, each caught, plus the clean counterpart."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest

from llama4_deploy.graphs.lint_tensorrt import OPERATORS, TENSORRT_VERSION, lint_tensorrt

F = ir.DataType.FLOAT


def _value(name, dtype=F, shape=(2, 4)):
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(list(shape)))


def _init(name, array, dtype=None):
    tensor = ir.tensor(array, dtype=dtype, name=name)
    return ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(tensor.shape), const_value=tensor)


def _model(nodes, inputs, outputs, initializers=(), opset=21) -> ir.Model:
    return ir.Model(
        ir.Graph(inputs, outputs, nodes=nodes, initializers=list(initializers), opset_imports={"": opset}),
        ir_version=10,
    )


def _unary(op_type, dtype=F, attributes=None, domain=""):
    x = _value("x", dtype)
    node = ir.node(op_type, [x], attributes or {}, domain=domain, name=f"/{op_type}")
    return _model([node], [x], node.outputs)


def _one(problems, *words):
    assert len(problems) == 1, problems
    for word in words:
        assert word in problems[0], problems[0]


def test_clean_graph_has_no_problem():
    assert lint_tensorrt(_unary("Sigmoid")) == []
    assert TENSORRT_VERSION == "10.15"


def test_opset_outside_9_to_24():
    _one(
        lint_tensorrt(_model([ir.node("Relu", [x := _value("x")], name="/Relu")], [x], [], opset=25)),
        "opset is 25",
        "9 to 24",
    )


def test_non_standard_domain():
    _one(lint_tensorrt(_unary("MatMulNBits", domain="com.microsoft")), "com.microsoft.MatMulNBits")


def test_unsupported_and_unlisted_operators():
    _one(lint_tensorrt(_unary("Unique")), "does not support")
    _one(lint_tensorrt(_unary("Hardmax")), "not in the TensorRT 10.15 operator table")
    assert OPERATORS["Unique"] is None


def test_types_per_operator():
    _one(lint_tensorrt(_unary("Sigmoid", ir.DataType.INT64)), "Sigmoid", "INT64")  # Sigmoid: FP32, FP16, BF16


def test_gather_types_exclude_fp8_and_int4():
    for dtype in (ir.DataType.FLOAT8E4M3FN, ir.DataType.INT4):
        data = _value("data", dtype, (8, 4))
        index = _value("index", ir.DataType.INT64, (2,))
        node = ir.node("Gather", [data, index], {"axis": 0}, name="/Gather")
        _one(lint_tensorrt(_model([node], [data, index], node.outputs)), "Gather", dtype.name)
    data = _value("data", ir.DataType.BFLOAT16, (8, 4))
    index = _value("index", ir.DataType.INT64, (2,))
    node = ir.node("Gather", [data, index], {"axis": 0}, name="/Gather")
    assert lint_tensorrt(_model([node], [data, index], node.outputs)) == []


def test_types_inferred_through_untyped_values():
    """The lowering passes leave some outputs untyped; the lint infers them (Cast to INT64, then Sigmoid)."""
    x = _value("x")
    cast = ir.node("Cast", [x], {"to": ir.DataType.INT64}, name="/Cast")
    sigmoid = ir.node("Sigmoid", [cast.outputs[0]], name="/Sigmoid")
    _one(lint_tensorrt(_model([cast, sigmoid], [x], sigmoid.outputs)), "/Sigmoid", "INT64")


def test_axes_must_be_constant():
    x, axes = _value("x"), _value("axes", ir.DataType.INT64, (1,))
    node = ir.node("ReduceSum", [x, axes], name="/ReduceSum")
    _one(lint_tensorrt(_model([node], [x, axes], node.outputs)), "ReduceSum", "input 1", "build-time constant")
    const = ir.node("Constant", [], {"value": ir.tensor(np.array([1], dtype=np.int64))}, name="/axes")
    x = _value("x")
    node = ir.node("ReduceSum", [x, const.outputs[0]], name="/ReduceSum")
    assert lint_tensorrt(_model([const, node], [x], node.outputs)) == []


def test_attention_with_past_is_refused():
    q, k, v = (_value(n, F, (1, 2, 3, 4)) for n in "qkv")
    past_k, past_v = _value("past_k", F, (1, 2, 5, 4)), _value("past_v", F, (1, 2, 5, 4))
    node = ir.node("Attention", [q, k, v, None, past_k, past_v], name="/Attention", num_outputs=3)
    node.outputs[0].name = "y"
    problems = lint_tensorrt(_model([node], [q, k, v, past_k, past_v], node.outputs[:1], opset=23))
    assert len(problems) == 2 and all("decomposed" in p for p in problems), problems
    q, k, v = (_value(n, F, (1, 2, 3, 4)) for n in "qkv")
    node = ir.node("Attention", [q, k, v], name="/Attention")
    assert lint_tensorrt(_model([node], [q, k, v], node.outputs, opset=23)) == []


def test_topk_sorted_and_k_limit():
    x = _value("x", F, (2, 5000))
    k = _init("k", np.array([3840], dtype=np.int64))
    node = ir.node("TopK", [x, k], {"axis": -1, "sorted": 0}, name="/TopK", num_outputs=2)
    problems = lint_tensorrt(_model([node], [x], node.outputs, [k]))
    assert len(problems) == 2 and "sorted=0" in problems[0] and "K=3840" in problems[1], problems
    # a K computed from dimensions needs its bound
    x = _value("x", F, (2, 5000))
    shape = ir.node("Shape", [x], {"start": 0, "end": 1}, name="/Shape")
    node = ir.node("TopK", [x, shape.outputs[0]], {"axis": -1}, name="/TopK", num_outputs=2)
    model = _model([shape, node], [x], node.outputs)
    _one(lint_tensorrt(model), "no bound")
    _one(lint_tensorrt(model, topk_bound=4000), "reaches 4000")
    assert lint_tensorrt(model, topk_bound=640) == []


def test_scatter_nd_reduction():
    data, index, update = _value("data"), _value("index", ir.DataType.INT64, (2, 1)), _value("update")
    node = ir.node("ScatterND", [data, index, update], {"reduction": "add"}, name="/ScatterND")
    _one(lint_tensorrt(_model([node], [data, index, update], node.outputs)), "reduction=add")


def _dq(q_array, q_dtype, scale, attributes, zero=None, constant=True):
    inits = []
    if constant:
        q = _init("q", q_array, q_dtype)
        inits.append(q)
    else:
        q = _value("q", q_dtype, q_array.shape)
    s = _init("s", scale)
    inits.append(s)
    inputs = [q, s]
    if zero is not None:
        z = _init("z", zero[0], zero[1])
        inits.append(z)
        inputs.append(z)
    node = ir.node("DequantizeLinear", inputs, attributes, name="/DequantizeLinear")
    return _model([node], [] if constant else [q], node.outputs, inits)


def test_dq_zero_point_must_be_zero():
    q = np.ones((4, 2), dtype=np.int8)
    _one(
        lint_tensorrt(_dq(q, None, np.ones(2, np.float32), {"axis": 1}, zero=(np.full(2, 3, np.int8), None))),
        "non-zero zero point",
    )
    assert lint_tensorrt(_dq(q, None, np.ones(2, np.float32), {"axis": 1}, zero=(np.zeros(2, np.int8), None))) == []


def test_blocked_int4_only_on_2d_constants_with_block_64_or_128():
    int4 = ir.DataType.INT4
    ok = _dq(np.zeros((128, 4), np.int8), int4, np.ones((1, 4), np.float32), {"axis": 0, "block_size": 128})
    assert lint_tensorrt(ok) == []
    stacked = _dq(np.zeros((2, 128, 4), np.int8), int4, np.ones((2, 1, 4), np.float32), {"axis": 1, "block_size": 128})
    _one(lint_tensorrt(stacked), "rank 3", "2-D constant INT4")
    small = _dq(np.zeros((64, 4), np.int8), int4, np.ones((2, 4), np.float32), {"axis": 0, "block_size": 32})
    _one(lint_tensorrt(small), "block_size 32", "64 or 128")


def test_int4_is_weight_only():
    model = _dq(np.zeros((4, 2), np.int8), ir.DataType.INT4, np.ones(2, np.float32), {"axis": 1}, constant=False)
    _one(lint_tensorrt(model), "INT4 tensor computed at run time")


def test_fp8_activation_scales_per_tensor():
    x = _value("x", F, (2, 4))
    scale = _init("s", np.ones(4, np.float32))
    zero = _init("z", np.zeros(4, ml_dtypes.float8_e4m3fn))
    quant = ir.node("QuantizeLinear", [x, scale, zero], {"axis": 1}, name="/QuantizeLinear")
    dequant = ir.node("DequantizeLinear", [quant.outputs[0], scale, zero], {"axis": 1}, name="/DequantizeLinear")
    problems = lint_tensorrt(_model([quant, dequant], [x], dequant.outputs, [scale, zero]))
    assert len(problems) == 2 and all("per tensor" in p for p in problems), problems
    x = _value("x", F, (2, 4))
    scale = _init("s", np.array(0.5, np.float32))
    zero = _init("z", np.array(0, ml_dtypes.float8_e4m3fn))
    quant = ir.node("QuantizeLinear", [x, scale, zero], name="/QuantizeLinear")
    dequant = ir.node("DequantizeLinear", [quant.outputs[0], scale, zero], name="/DequantizeLinear")
    assert lint_tensorrt(_model([quant, dequant], [x], dequant.outputs, [scale, zero])) == []


def test_quantize_zero_point_must_be_zero():
    x = _value("x", F, (2, 4))
    scale = _init("s", np.array(0.5, np.float32))
    zero = _init("z", np.array(1.0, ml_dtypes.float8_e4m3fn))
    quant = ir.node("QuantizeLinear", [x, scale, zero], name="/QuantizeLinear")
    _one(lint_tensorrt(_model([quant], [x], quant.outputs, [scale, zero])), "QuantizeLinear", "non-zero zero point")


@pytest.mark.parametrize("onnx23", [False, True])
def test_attention_forms_of_the_pipeline(onnx23):
    """The project's own lowering: decomposed attention is clean, onnx23 (with past/present) is refused."""
    from llama4_deploy.graphs.lower_attention import LowerAttentionPass
    from tests.graphs.test_lower_attention import _model as attention_model

    model = attention_model()
    LowerAttentionPass("onnx23" if onnx23 else "decomposed")(model)
    problems = lint_tensorrt(model)
    assert bool(problems) == onnx23, problems


def test_cli_lint_applies_tensorrt_rules_to_a_tensorrt_bundle(tmp_path):
    """`llama4-deploy lint DIR` adds the parser's rules when the manifest says tensorrt (and only then)."""
    import json

    from tests.test_cli import invoke

    data, index, update = _value("data"), _value("index", ir.DataType.INT64, (2, 1)), _value("update")
    node = ir.node("ScatterND", [data, index, update], {"reduction": "add"}, name="/ScatterND")
    node.outputs[0].name = "out"
    ir.save(_model([node], [data, index, update], node.outputs), tmp_path / "capacity.onnx")
    record = {
        "engine": {"backend": "tensorrt", "graphs": {}},
        "profiles": {"max_batch": 1, "prefill_tokens": 8},
        "model": {"top_k": 1, "num_experts": 8},
    }
    (tmp_path / "manifest.json").write_text(json.dumps(record))
    result = invoke("lint", tmp_path)
    assert result.exit_code == 1 and "reduction=add" in result.output, result.output
    record["engine"]["backend"] = "onnxruntime"
    (tmp_path / "manifest.json").write_text(json.dumps(record))
    assert invoke("lint", tmp_path).exit_code == 0
