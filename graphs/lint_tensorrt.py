"""TensorRT-compatibility lint, pinned to TensorRT 10.15's ONNX parser.

Source of every line of the table below: onnx-tensorrt's `docs/operators.md` as published for
TensorRT 10.15 ("TensorRT 10.15 supports operators in the inclusive range of opset 9 to opset 24";
https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md at the 10.15 release), and, for the
Q/DQ rules, TensorRT's explicit-quantization guide
(https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/work-quantized-types.html).
The table holds the operators this pipeline can emit and the ones a lowering might plausibly reach
for; an operator absent from it is refused, not assumed supported. Re-read the source before
raising TENSORRT_VERSION.

Rules, each one sentence per violation (`lint_tensorrt` returns them; empty means clean):

    opset         the default domain's opset is within 9 ... 24
    domain        standard ONNX only: no com.microsoft, no llama4_deploy (project) ops
    operator      listed and supported ("Y") in the table
    types         the op's data input (Where: X; Constant / ConstantOfShape: its value) has a listed type
    constants     inputs the table says must be build-time constants are (Reduce* axes, Squeeze /
                  Unsqueeze axes, CumSum axis, OneHot depth, TopK K ...)
    Attention     no past_key / past_value inputs, no present_key / present_value / qk_matmul_output
                  outputs, no softcap or qk_matmul_output_mode
    TopK          sorted = 1; K < 3840 (a K computed from dimensions needs `topk_bound`, its largest value)
    ScatterND     reduction none
    Q/DQ          zero points are 0; QuantizeLinear to FP8 and DequantizeLinear of FP8 activations take
                  one per-tensor scale; INT4 is weight-only (a constant); blocked DequantizeLinear only on
                  2-D constant INT4 weights with block_size 64 or 128

"Initializer" / "build-time constant" in the table is read as: an initializer or a Constant node's
output (the parser turns both into weights).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

TENSORRT_VERSION = "10.15"
OPSET_RANGE = (9, 24)
TOPK_K_LIMIT = 3840  # K must be less than this
INT4_BLOCKS = (64, 128)
_STANDARD = ("", "ai.onnx")

D = ir.DataType
_TYPE_NAMES = {
    "FP32": D.FLOAT,
    "FP16": D.FLOAT16,
    "BF16": D.BFLOAT16,
    "INT32": D.INT32,
    "INT64": D.INT64,
    "BOOL": D.BOOL,
    "INT8": D.INT8,
    "UINT8": D.UINT8,
    "INT4": D.INT4,
    "FP8": (D.FLOAT8E4M3FN, D.FLOAT8E5M2),
    "FP4": D.FLOAT4E2M1,
}


@dataclasses.dataclass(frozen=True)
class OpSupport:
    types: tuple[str, ...]
    restrictions: str = ""  # the table's own words, kept for the report
    constant_inputs: tuple[int, ...] = ()  # inputs that must be build-time constants
    typed_input: int = 0  # which input the listed types apply to

    def allows(self, dtype: ir.DataType) -> bool:
        for name in self.types:
            allowed = _TYPE_NAMES[name]
            if dtype == allowed or isinstance(allowed, tuple) and dtype in allowed:
                return True
        return False


_F = ("FP32", "FP16", "BF16")
_FI = _F + ("INT32", "INT64")
_FIB = _FI + ("BOOL",)
_AXES_CONSTANT = "`axes` must be an initializer"
# operator -> support, from onnx-tensorrt docs/operators.md (TensorRT 10.15); None: listed "N"
OPERATORS: dict[str, OpSupport | None] = {
    "Abs": OpSupport(_FI),
    "Add": OpSupport(_FI),
    "And": OpSupport(("BOOL",)),
    "ArgMax": OpSupport(_FI),
    "ArgMin": OpSupport(_FI),
    "Attention": OpSupport(
        _F + ("INT8", "FP8"),
        "`Q`, `K`, `V` and `attn_mask` must be 4D. `past_key`, "
        "`past_value` and `nonpad_kv_seqlen` inputs are unsupported. `present_key`, "
        "`present_value` and `qk_matmul_output` outputs are unsupported.",
    ),
    "Cast": OpSupport(_FI + ("UINT8", "BOOL")),
    "CastLike": OpSupport(_FI + ("UINT8", "BOOL")),
    "Ceil": OpSupport(_F),
    "Clip": OpSupport(_F),
    "Concat": OpSupport(_FIB),
    "Constant": OpSupport(
        _F + ("FP8", "FP4", "INT4", "INT32", "INT64", "BOOL"),
        "`sparse_value`, `value_string`, and `value_strings` attributes are unsupported.",
    ),
    "ConstantOfShape": OpSupport(_F + ("FP8", "FP4", "INT4", "INT32", "INT64", "BOOL")),
    "Cos": OpSupport(_F),
    "CumSum": OpSupport(_F, "`axis` must be a build-time constant", (1,)),
    "DequantizeLinear": OpSupport(("INT8", "FP8", "FP4", "INT4"), "`x_zero_point` must be zero"),
    "Div": OpSupport(_FI),
    "Einsum": OpSupport(_F),
    "Equal": OpSupport(_FI),
    "Erf": OpSupport(_F),
    "Exp": OpSupport(_F),
    "Expand": OpSupport(_FIB),
    "Flatten": OpSupport(_FIB),
    "Floor": OpSupport(_F),
    "Gather": OpSupport(_FIB),
    "GatherElements": OpSupport(_FIB),
    "GatherND": OpSupport(_FIB),
    "Gelu": OpSupport(_F + ("INT8", "INT32", "INT64")),
    "Gemm": OpSupport(_F),
    "Greater": OpSupport(_FI),
    "GreaterOrEqual": OpSupport(_FI),
    "Identity": OpSupport(_FIB),
    "IsInf": OpSupport(_F),
    "IsNaN": OpSupport(_FI),
    "LayerNormalization": OpSupport(_F, "Only the first output `Y` is supported."),
    "Less": OpSupport(_FI),
    "LessOrEqual": OpSupport(_FI),
    "Log": OpSupport(_F),
    "LogSoftmax": OpSupport(_F),
    "MatMul": OpSupport(_F),
    "MatMulInteger": None,
    "Max": OpSupport(_FI),
    "Mean": OpSupport(_F + ("FP8", "INT32", "INT64")),
    "Min": OpSupport(_FI),
    "Mod": OpSupport(_FI),
    "Mul": OpSupport(_FI),
    "Neg": OpSupport(_FI),
    "NonZero": OpSupport(("FP32", "FP16")),
    "Not": OpSupport(("BOOL",)),
    "OneHot": OpSupport(_FIB, "`depth` must be a build-time constant", (1,)),
    "Or": OpSupport(("BOOL",)),
    "Pad": OpSupport(_FI),
    "Pow": OpSupport(_FI),
    "QLinearMatMul": None,
    "QuantizeLinear": OpSupport(_F, "`y_zero_point` must be 0"),
    "Range": OpSupport(_FI),
    "Reciprocal": OpSupport(_F),
    **{
        reduce: OpSupport(_FI, _AXES_CONSTANT, (1,))
        for reduce in (
            "ReduceL1",
            "ReduceL2",
            "ReduceLogSum",
            "ReduceLogSumExp",
            "ReduceMax",
            "ReduceMean",
            "ReduceMin",
            "ReduceProd",
            "ReduceSum",
            "ReduceSumSquare",
        )
    },
    "Relu": OpSupport(_FI),
    "Reshape": OpSupport(_FIB),
    "RMSNormalization": OpSupport(_F),
    "RotaryEmbedding": OpSupport(_F, "`position_ids` must be INT64"),
    "Round": OpSupport(_F),
    "ScatterElements": OpSupport(_FI),
    "ScatterND": OpSupport(_FI, "`reduction` other than `none` is not supported"),
    "Shape": OpSupport(_FIB),
    "Sigmoid": OpSupport(_F),
    "Sign": OpSupport(_FI),
    "Sin": OpSupport(_F),
    "Size": OpSupport(_FIB),
    "Slice": OpSupport(_FIB),
    "Softmax": OpSupport(_F),
    "Split": OpSupport(_FIB),
    "Sqrt": OpSupport(_F),
    "Squeeze": OpSupport(_FIB, "`axes` must be resolvable to a constant.", (1,)),
    "Sub": OpSupport(_FI),
    "Sum": OpSupport(_FI),
    "Tanh": OpSupport(_F),
    "Tile": OpSupport(_FIB),
    "TopK": OpSupport(_FI, "`sorted` must be 1. `K` input must be less than 3840."),
    "Transpose": OpSupport(_FIB),
    "Trilu": OpSupport(_FIB),
    "Unique": None,
    "Unsqueeze": OpSupport(_FIB, "`axes` must be resolvable to a constant.", (1,)),
    "Where": OpSupport(_FIB, typed_input=1),
    "Xor": OpSupport(("BOOL",)),
    "Compress": None,
    "DynamicQuantizeLinear": None,
    "SplitToSequence": None,
    "SequenceAt": None,
    "Bernoulli": None,
    "Multinomial": None,
    "Optional": None,
}

_BOOL_OUT = {"Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "And", "Or", "Not", "Xor", "IsNaN", "IsInf"}
_INT64_OUT = {"Shape", "Size", "ArgMax", "ArgMin", "NonZero"}


def _attr_tensor_dtype(node: ir.Node) -> ir.DataType | None:
    attr = node.attributes.get("value")
    if attr is not None and attr.type == ir.AttributeType.TENSOR:
        return attr.as_tensor().dtype
    return None


def infer_dtypes(graph: ir.Graph) -> dict[ir.Value, ir.DataType | None]:
    """Element type of every value: the declared one, else inferred from its producer (the lowering
    passes do not always write types). None where it cannot be told."""
    dtypes: dict[ir.Value, ir.DataType | None] = {}

    def of(value):
        if value is None:
            return None
        if value.dtype is not None:
            return value.dtype
        return dtypes.get(value)

    for value in list(graph.inputs) + list(graph.initializers.values()):
        dtypes[value] = value.dtype
    for node in graph:
        op = node.op_type
        first = next((of(v) for v in node.inputs if of(v) is not None), None)
        if op == "Cast":
            out = [ir.DataType(node.attributes["to"].as_int())]
        elif op in _BOOL_OUT:
            out = [D.BOOL]
        elif op in _INT64_OUT:
            out = [D.INT64]
        elif op == "TopK":
            out = [of(node.inputs[0]), D.INT64]
        elif op == "DequantizeLinear":
            out = [of(node.inputs[1])]
        elif op == "QuantizeLinear":
            out = [of(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else D.UINT8]
        elif op in ("Constant", "ConstantOfShape"):
            out = [_attr_tensor_dtype(node) or (D.FLOAT if op == "ConstantOfShape" else None)]
        elif op == "Where":
            out = [of(node.inputs[1]) or of(node.inputs[2])]
        else:
            out = [first]
        for i, value in enumerate(node.outputs):
            dtypes[value] = value.dtype if value.dtype is not None else (out[i] if i < len(out) else first)
    return dtypes


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """The value's array when it is a build-time constant (initializer or Constant output), else None."""
    if value is None:
        return None
    if value.const_value is not None and not value.is_graph_input():
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain in _STANDARD:
        attr = producer.attributes.get("value")
        if attr is not None and attr.type == ir.AttributeType.TENSOR:
            return attr.as_tensor().numpy()
    return None


def _is_constant(value: ir.Value | None) -> bool:
    if value is None:
        return False
    if value.const_value is not None and not value.is_graph_input():
        return True  # no need to read (possibly external) data
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant" and producer.domain in _STANDARD


def _size(value: ir.Value) -> int | None:
    """Elements of a value whose shape is static, else None."""
    if value.shape is None or not all(isinstance(d, int) for d in value.shape):
        array = _constant(value)
        return None if array is None else int(array.size)
    return int(np.prod(list(value.shape), dtype=np.int64))


def _type_name(dtype: ir.DataType | None) -> str:
    return "an unknown type" if dtype is None else dtype.name


def lint_tensorrt(model: ir.Model, topk_bound: int | None = None) -> list[str]:
    """Problems found, one sentence each, against TensorRT TENSORRT_VERSION's ONNX parser.
    `topk_bound`: the largest value a TopK K computed from input dimensions takes under the bundle's
    profiles (the capacity dispatch's slots per expert); without it such a K is reported."""
    graph = model.graph
    problems: list[str] = []
    opset = graph.opset_imports.get("", graph.opset_imports.get("ai.onnx"))
    low, high = OPSET_RANGE
    if opset is None or not low <= opset <= high:
        problems.append(f"the graph's ONNX opset is {opset}; TensorRT {TENSORRT_VERSION} parses opsets {low} to {high}")
    if model.functions:
        problems.append(f"the graph has {len(model.functions)} local function(s); this lint checks inlined graphs only")
    dtypes = infer_dtypes(graph)
    for node in graph:
        where = f"node {node.name or node.op_type}"
        if node.domain not in _STANDARD:
            problems.append(f"{where} is {node.domain}.{node.op_type}, not a standard ONNX op TensorRT's parser takes")
            continue
        support = OPERATORS.get(node.op_type, "absent")
        if support == "absent":
            problems.append(
                f"{where} is {node.op_type}, which is not in the TensorRT {TENSORRT_VERSION} operator table"
            )
            continue
        if support is None:
            problems.append(f"{where} is {node.op_type}, which TensorRT {TENSORRT_VERSION}'s parser does not support")
            continue
        problems.extend(_check_types(node, support, dtypes, where))
        for index in support.constant_inputs:
            if index < len(node.inputs) and node.inputs[index] is not None and not _is_constant(node.inputs[index]):
                problems.append(
                    f"{where} ({node.op_type}) has input {index} computed at run time; TensorRT needs a "
                    f"build-time constant there ({support.restrictions})"
                )
        check = _SPECIFIC.get(node.op_type)
        if check is not None:
            problems.extend(check(node, where, dtypes, topk_bound))
    return problems


def _check_types(node: ir.Node, support: OpSupport, dtypes, where: str) -> list[str]:
    if node.op_type in ("Constant", "ConstantOfShape"):
        dtype = _attr_tensor_dtype(node) or (D.FLOAT if node.op_type == "ConstantOfShape" else None)
    elif support.typed_input < len(node.inputs) and node.inputs[support.typed_input] is not None:
        dtype = dtypes.get(node.inputs[support.typed_input], node.inputs[support.typed_input].dtype)
    else:
        return []
    if dtype is None or support.allows(dtype):
        return []  # unknown types are left to the parser (the passes type everything that reaches here)
    return [
        f"{where} ({node.op_type}) takes {_type_name(dtype)}; TensorRT {TENSORRT_VERSION} lists "
        f"{', '.join(support.types)} for it"
    ]


def _attention(node, where, dtypes, topk_bound) -> list[str]:
    out = []
    names = {4: "past_key", 5: "past_value", 6: "nonpad_kv_seqlen"}
    for index, name in names.items():
        if index < len(node.inputs) and node.inputs[index] is not None:
            out.append(
                f"{where} (Attention) has a {name} input, which TensorRT's parser does not take; lower "
                f"attention to the decomposed form"
            )
    for index, name in {1: "present_key", 2: "present_value", 3: "qk_matmul_output"}.items():
        if (
            index < len(node.outputs)
            and node.outputs[index].name
            and (node.outputs[index].uses() or node.outputs[index].is_graph_output())
        ):
            out.append(f"{where} (Attention) has a used {name} output, which TensorRT's parser does not produce")
    for attr in ("softcap", "qk_matmul_output_mode"):
        if attr in node.attributes:
            out.append(f"{where} (Attention) sets {attr}, which TensorRT's parser does not support")
    return out


def _topk(node, where, dtypes, topk_bound) -> list[str]:
    out = []
    sorted_attr = node.attributes.get("sorted")
    if sorted_attr is not None and sorted_attr.as_int() != 1:
        out.append(f"{where} (TopK) has sorted={sorted_attr.as_int()}; TensorRT needs sorted=1")
    k = _constant(node.inputs[1]) if len(node.inputs) > 1 else None
    if k is not None:
        if int(np.max(k)) >= TOPK_K_LIMIT:
            out.append(f"{where} (TopK) has K={int(np.max(k))}; TensorRT needs K < {TOPK_K_LIMIT}")
    elif topk_bound is None:
        out.append(
            f"{where} (TopK) has a K computed at run time and no bound was given; TensorRT needs K < {TOPK_K_LIMIT}"
        )
    elif topk_bound >= TOPK_K_LIMIT:
        out.append(
            f"{where} (TopK) has a K that reaches {topk_bound} under the bundle's profiles; TensorRT needs "
            f"K < {TOPK_K_LIMIT}"
        )
    return out


def _scatter_nd(node, where, dtypes, topk_bound) -> list[str]:
    reduction = node.attributes.get("reduction")
    if reduction is not None and reduction.as_string() != "none":
        return [f"{where} (ScatterND) has reduction={reduction.as_string()}; TensorRT takes only reduction none"]
    return []


def _zero_point(node, index: int, where: str) -> list[str]:
    if index >= len(node.inputs) or node.inputs[index] is None:
        return []
    zero = _constant(node.inputs[index])
    if zero is None:
        return [f"{where} ({node.op_type}) has a zero point computed at run time; TensorRT needs a zero point of 0"]
    if np.any(zero.astype(np.float32) != 0):
        return [
            f"{where} ({node.op_type}) has a non-zero zero point; TensorRT takes symmetric quantization only "
            f"(zero point 0)"
        ]
    return []


def _per_tensor(scale: ir.Value) -> bool:
    size = _size(scale)
    return size == 1


def _quantize(node, where, dtypes, topk_bound) -> list[str]:
    out = _zero_point(node, 2, where)
    target = dtypes.get(node.outputs[0])
    if target in _TYPE_NAMES["FP8"] and not _per_tensor(node.inputs[1]):
        out.append(
            f"{where} (QuantizeLinear) quantizes an activation to FP8 with a scale that is not per tensor; "
            f"TensorRT takes per-tensor FP8 activation scales"
        )
    if target == D.INT4:
        out.append(f"{where} (QuantizeLinear) quantizes to INT4 at run time; TensorRT's INT4 is weight-only")
    return out


def _dequantize(node, where, dtypes, topk_bound) -> list[str]:
    out = _zero_point(node, 2, where)
    x, scale = node.inputs[0], node.inputs[1]
    dtype = dtypes.get(x)
    constant = _is_constant(x)
    block = node.attributes.get("block_size")
    block = block.as_int() if block is not None else 0
    if dtype == D.INT4 and not constant:
        out.append(
            f"{where} (DequantizeLinear) dequantizes an INT4 tensor computed at run time; TensorRT's INT4 is "
            f"weight-only (a constant)"
        )
    if dtype in _TYPE_NAMES["FP8"] and not constant and not _per_tensor(scale):
        out.append(
            f"{where} (DequantizeLinear) dequantizes an FP8 activation with a scale that is not per tensor; "
            f"TensorRT takes per-tensor FP8 activation scales"
        )
    if block:
        rank = len(x.shape) if x.shape is not None else None
        if not (constant and rank == 2 and dtype == D.INT4):
            what = f"{'a constant' if constant else 'a run-time'} {_type_name(dtype)} tensor of rank {rank}"
            out.append(
                f"{where} (DequantizeLinear) is blocked on {what}; TensorRT documents blocked "
                f"DequantizeLinear only on 2-D constant INT4 weights"
            )
        if block not in INT4_BLOCKS:
            out.append(
                f"{where} (DequantizeLinear) has block_size {block}; TensorRT documents blocks of "
                f"{' or '.join(map(str, INT4_BLOCKS))}"
            )
    return out


_SPECIFIC = {
    "Attention": _attention,
    "TopK": _topk,
    "ScatterND": _scatter_nd,
    "QuantizeLinear": _quantize,
    "DequantizeLinear": _dequantize,
}
