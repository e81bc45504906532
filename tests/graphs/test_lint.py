"""The static-shape lint catches each forbidden construct and passes real bundles."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from llama4_deploy.graphs.lint import FORBIDDEN, SHAPE_INPUTS, lint_static

F, I64, I32, B = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32, TensorProto.BOOL


def _graph_with(op_type: str, domain: str = "") -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([4]))
    node = ir.Node(domain, op_type, [x], name=f"/bad/{op_type}", num_outputs=1)
    graph = ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 21, "llama4_deploy": 1})
    return ir.Model(graph, ir_version=10)


def _model(nodes, inputs, outputs, initializers=(), check: bool = True) -> ir.Model:
    """A model built with onnx.helper (checked to be valid ONNX, shapes inferred), as onnx_ir sees it."""
    proto = helper.make_model(
        helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info(*i) for i in inputs],
            [helper.make_tensor_value_info(*o) for o in outputs],
            list(initializers),
        ),
        opset_imports=[helper.make_opsetid("", 21)],
        ir_version=10,
    )
    if check:
        proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
        onnx.checker.check_model(proto)
    return ir.from_proto(proto)


def _const(name: str, values, dtype=I64) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], name=f"/c/{name}", value=helper.make_tensor(name, dtype, [len(values)], values)
    )


def _value_problem(node: str, op_type: str, role: str, origin: str) -> str:
    return (
        f"node {node} is {op_type} whose {role} input is computed from the values of {origin}, "
        "not from input dimensions"
    )


# -- forbidden ops --------------------------------------------------------------------------------


@pytest.mark.parametrize("op_type", sorted(FORBIDDEN))
def test_forbidden_ops(op_type):
    problems = lint_static(_graph_with(op_type))
    assert problems == [f"node /bad/{op_type} is {op_type}, whose output shape depends on values"]


def test_unlowered_moe():
    assert "not lowered" in lint_static(_graph_with("MoE", "llama4_deploy"))[0]


# -- shape-carrying inputs computed from values ---------------------------------------------------


def test_reshape_shape_from_input_values():
    model = _model(
        [
            helper.make_node("Cast", ["dims"], ["shape"], name="/cast", to=I64),
            helper.make_node("Reshape", ["x", "shape"], ["y"], name="/bad/Reshape"),
        ],
        [("x", F, [2, 3]), ("dims", I32, [2])],
        [("y", F, None)],
    )
    assert lint_static(model) == [_value_problem("/bad/Reshape", "Reshape", "shape", "dims")]


def test_expand_shape_from_values():
    model = _model(
        [
            helper.make_node("Add", ["n", "n"], ["shape"], name="/add"),
            helper.make_node("Expand", ["x", "shape"], ["y"], name="/bad/Expand"),
        ],
        [("x", F, [1, 3]), ("n", I64, [2])],
        [("y", F, None)],
    )
    assert lint_static(model) == [_value_problem("/bad/Expand", "Expand", "shape", "n")]


def test_slice_ends_from_values():
    # ends = Shape(x)[0:1] - ReduceSum(pad): shape arithmetic, but one term is a value
    model = _model(
        [
            _const("zero", [0]),
            _const("one", [1]),
            helper.make_node("Shape", ["x"], ["sx"], name="/shape"),
            helper.make_node("Slice", ["sx", "zero", "one"], ["n"], name="/n"),
            helper.make_node("Cast", ["pad"], ["pad64"], name="/cast", to=I64),
            helper.make_node("ReduceSum", ["pad64"], ["npad"], name="/npad", keepdims=1),
            helper.make_node("Sub", ["n", "npad"], ["ends"], name="/ends"),
            helper.make_node("Slice", ["x", "zero", "ends"], ["y"], name="/bad/Slice"),
        ],
        [("x", F, [8, 3]), ("pad", B, [8])],
        [("y", F, None)],
    )
    assert lint_static(model) == [_value_problem("/bad/Slice", "Slice", "ends", "pad")]


def test_tile_repeats_from_values():
    model = _model(
        [helper.make_node("Tile", ["x", "reps"], ["y"], name="/bad/Tile")],
        [("x", F, [2, 3]), ("reps", I64, [2])],
        [("y", F, None)],
    )
    assert lint_static(model) == [_value_problem("/bad/Tile", "Tile", "repeats", "reps")]


def test_constant_of_shape_from_reduce_max():
    model = _model(
        [
            helper.make_node("ReduceMax", ["ids"], ["longest"], name="/max", keepdims=1),
            helper.make_node("ConstantOfShape", ["longest"], ["y"], name="/bad/ConstantOfShape"),
        ],
        [("ids", I64, [4])],
        [("y", F, None)],
    )
    assert lint_static(model) == [_value_problem("/bad/ConstantOfShape", "ConstantOfShape", "shape", "ids")]


def test_range_limit_from_values():
    # the tempting mistake: iterate up to the longest cached length, read from past_lengths' values
    model = _model(
        [
            _const("zero", [0]),
            _const("step", [1]),
            helper.make_node("ReduceMax", ["past_lengths"], ["longest"], name="/max", keepdims=1),
            helper.make_node("Squeeze", ["longest"], ["limit"], name="/limit"),
            helper.make_node("Squeeze", ["zero"], ["start"], name="/start"),
            helper.make_node("Squeeze", ["step"], ["delta"], name="/delta"),
            helper.make_node("Range", ["start", "limit", "delta"], ["y"], name="/bad/Range"),
        ],
        [("past_lengths", I64, [2])],
        [("y", I64, None)],
    )
    assert lint_static(model) == [_value_problem("/bad/Range", "Range", "limit", "past_lengths")]


def test_topk_k_from_reduce_sum():
    model = _model(
        [
            helper.make_node("Cast", ["mask"], ["ones"], name="/cast", to=I64),
            helper.make_node("ReduceSum", ["ones"], ["k"], name="/count", keepdims=1),
            helper.make_node("TopK", ["x", "k"], ["values", "indices"], name="/bad/TopK"),
        ],
        [("x", F, [8]), ("mask", B, [8])],
        [("values", F, None), ("indices", I64, None)],
    )
    assert lint_static(model) == [_value_problem("/bad/TopK", "TopK", "K", "mask")]


def test_shape_gathered_at_value_index():
    # a Gather of the Shape is fine, but not when the index is a value: the result is then a value
    model = _model(
        [
            _const("minus_one", [-1]),
            helper.make_node("Shape", ["x"], ["sx"], name="/shape"),
            helper.make_node("Gather", ["sx", "axis"], ["dim"], name="/dim", axis=0),
            helper.make_node("Concat", ["dim", "minus_one"], ["shape"], name="/concat", axis=0),
            helper.make_node("Reshape", ["x", "shape"], ["y"], name="/bad/Reshape"),
        ],
        [("x", F, [4, 6]), ("axis", I64, [1])],
        [("y", F, None)],
    )
    assert lint_static(model) == [_value_problem("/bad/Reshape", "Reshape", "shape", "axis")]


def test_value_reshaped_then_used_as_shape():
    # Reshape and Slice pass values through: the axes below are still pos's values
    model = _model(
        [
            _const("flat", [-1]),
            _const("zero", [0]),
            _const("one", [1]),
            helper.make_node("Reshape", ["pos", "flat"], ["pos1"], name="/flat"),
            helper.make_node("Slice", ["pos1", "zero", "one"], ["axes"], name="/first"),
            helper.make_node("Unsqueeze", ["x", "axes"], ["y"], name="/bad/Unsqueeze"),
        ],
        [("x", F, [4]), ("pos", I64, [1, 3])],
        [("y", F, None)],
        check=False,
    )  # valid, but value axes leave y without a rank, which the checker wants
    assert lint_static(model) == [_value_problem("/bad/Unsqueeze", "Unsqueeze", "axes", "pos")]


@pytest.mark.parametrize("op_type,index", sorted((op, i) for op, roles in SHAPE_INPUTS.items() for i in roles))
def test_every_shape_input_is_checked(op_type, index):
    """Each shape-carrying input in the table, fed from a graph input's values, is reported alone."""
    constants = [
        ir.Node("", "Constant", [], name=f"/c{i}", attributes=[ir.AttrTensor("value", ir.tensor([1]))])
        for i in range(index)
    ]  # the inputs before it: constants, which pass
    value = ir.Value(name=f"in{index}", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1]))
    node = ir.Node("", op_type, [c.outputs[0] for c in constants] + [value], name=f"/bad/{op_type}", num_outputs=1)
    graph = ir.Graph([value], node.outputs, nodes=[*constants, node], opset_imports={"": 21})
    problems = lint_static(ir.Model(graph, ir_version=10))
    assert problems == [_value_problem(f"/bad/{op_type}", op_type, SHAPE_INPUTS[op_type][index], f"in{index}")]


def test_nodes_out_of_order_are_followed():
    # the producer of Reshape's shape is listed after it: the lint still follows the dataflow
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["y"], name="/bad/Reshape"),
        helper.make_node("Cast", ["dims"], ["shape"], name="/cast", to=I64),
        helper.make_node("Reshape", ["x", "sx"], ["z"], name="/good/Reshape"),
        helper.make_node("Shape", ["x"], ["sx"], name="/shape"),
    ]
    model = _model(
        nodes, [("x", F, [2, 3]), ("dims", I32, [2])], [("y", F, None), ("z", F, None)], check=False
    )  # out of order on purpose, which the checker rejects
    assert lint_static(model) == [_value_problem("/bad/Reshape", "Reshape", "shape", "dims")]


def test_subgraph_nodes_are_checked():
    # If is forbidden anyway; a value-shaped Reshape inside its branch is reported on top of that
    branch = helper.make_graph(
        [helper.make_node("Reshape", ["x", "dims"], ["y"], name="/bad/Reshape")],
        "then",
        [],
        [helper.make_tensor_value_info("y", F, None)],
    )
    model = _model(
        [helper.make_node("If", ["cond"], ["out"], name="/if", then_branch=branch, else_branch=branch)],
        [("x", F, [2, 3]), ("dims", I64, [2]), ("cond", B, [])],
        [("out", F, None)],
        check=False,
    )  # the branch outputs have no shape, which the checker wants
    problems = lint_static(model)
    assert problems[0] == "node /if is If, whose output shape depends on values"
    assert _value_problem("/if//bad/Reshape", "Reshape", "shape", "dims") in problems


def test_local_functions_are_followed_per_call():
    # the same function body is fine where its shape argument is a shape, not where it is a value
    body = helper.make_function(
        "local",
        "reshape_to",
        ["x", "shape"],
        ["y"],
        [helper.make_node("Reshape", ["x", "shape"], ["y"], name="/reshape")],
        [helper.make_opsetid("", 21)],
    )
    proto = helper.make_model(
        helper.make_graph(
            [
                helper.make_node("Shape", ["x"], ["sx"], name="/shape"),
                helper.make_node("reshape_to", ["x", "sx"], ["a"], name="/good", domain="local"),
                helper.make_node("reshape_to", ["x", "dims"], ["b"], name="/bad", domain="local"),
            ],
            "g",
            [helper.make_tensor_value_info("x", F, [2, 3]), helper.make_tensor_value_info("dims", I64, [2])],
            [helper.make_tensor_value_info("a", F, [2, 3]), helper.make_tensor_value_info("b", F, [2, 3])],
        ),
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("local", 1)],
        functions=[body],
        ir_version=10,
    )
    onnx.checker.check_model(proto)
    assert lint_static(ir.from_proto(proto)) == [_value_problem("/bad//reshape", "Reshape", "shape", "dims")]


# -- dimension-derived shapes pass ----------------------------------------------------------------


def test_reshape_shape_from_shape_slices_passes():
    # [B, T, H] -> [B * T, H] spelled as Concat(Shape(x)[0:1] * Shape(x)[1:2], [-1])
    model = _model(
        [
            _const("zero", [0]),
            _const("one", [1]),
            _const("two", [2]),
            _const("minus_one", [-1]),
            helper.make_node("Shape", ["x"], ["sx"], name="/shape"),
            helper.make_node("Slice", ["sx", "zero", "one"], ["b"], name="/b"),
            helper.make_node("Slice", ["sx", "one", "two"], ["t"], name="/t"),
            helper.make_node("Mul", ["b", "t"], ["n"], name="/n"),
            helper.make_node("Concat", ["n", "minus_one"], ["shape"], name="/concat", axis=0),
            helper.make_node("Reshape", ["x", "shape"], ["y"], name="/reshape"),
        ],
        [("x", F, [2, 5, 8])],
        [("y", F, None)],
    )
    assert lint_static(model) == []


def test_topk_k_from_shape_arithmetic_passes():
    # capacity = min(ceil(N * 0.5), N) with N = Shape(x)[0:1], as the capacity lowering computes it
    model = _model(
        [
            _const("zero", [0]),
            _const("one", [1]),
            _const("half", [0.5], F),
            helper.make_node("Shape", ["x"], ["sx"], name="/shape"),
            helper.make_node("Slice", ["sx", "zero", "one"], ["n"], name="/n"),
            helper.make_node("Cast", ["n"], ["nf"], name="/nf", to=F),
            helper.make_node("Mul", ["nf", "half"], ["scaled"], name="/scaled"),
            helper.make_node("Ceil", ["scaled"], ["ceil"], name="/ceil"),
            helper.make_node("Cast", ["ceil"], ["c"], name="/c", to=I64),
            helper.make_node("Min", ["c", "n"], ["k"], name="/k"),
            helper.make_node("Transpose", ["x"], ["xt"], name="/xt", perm=[1, 0]),
            helper.make_node("TopK", ["xt", "k"], ["values", "indices"], name="/topk"),
        ],
        [("x", F, [6, 4])],
        [("values", F, None), ("indices", I64, None)],
    )
    assert lint_static(model) == []


def test_range_over_past_length_passes():
    model = _model(
        [
            _const("two", [2]),
            _const("zero", [0]),
            _const("step", [1]),
            helper.make_node("Shape", ["past_key"], ["sk"], name="/shape"),
            helper.make_node("Gather", ["sk", "two"], ["c1"], name="/c1", axis=0),
            helper.make_node("Squeeze", ["c1"], ["limit"], name="/limit"),
            helper.make_node("Squeeze", ["zero"], ["start"], name="/start"),
            helper.make_node("Squeeze", ["step"], ["delta"], name="/delta"),
            helper.make_node("Range", ["start", "limit", "delta"], ["y"], name="/range"),
        ],
        [("past_key", F, [1, 2, 16, 4])],
        [("y", I64, None)],
    )
    assert lint_static(model) == []


def test_constant_of_shape_from_shape_passes():
    model = _model(
        [
            helper.make_node("Shape", ["x"], ["sx"], name="/shape"),
            helper.make_node("ConstantOfShape", ["sx"], ["y"], name="/zeros"),
        ],
        [("x", F, [2, 3])],
        [("y", F, None)],
    )
    assert lint_static(model) == []


def test_gather_by_routing_indices_passes():
    # routed indices are values, but Gather's indices fix no shape: weights gathered by them are fine
    weights = helper.make_tensor("w", F, [4, 3], [0.0] * 12)
    model = _model(
        [
            _const("k", [1]),
            helper.make_node("TopK", ["logits", "k"], ["score", "expert"], name="/route"),
            helper.make_node("Gather", ["w", "expert"], ["chosen"], name="/gather", axis=0),
        ],
        [("logits", F, [5, 4])],
        [("chosen", F, None)],
        [weights],
    )
    assert lint_static(model) == []


def test_bundle_is_clean(tiny_bundle):
    graphs = sorted(tiny_bundle.glob("*.onnx"))
    assert graphs
    for graph in graphs:
        assert lint_static(ir.load(graph)) == []
