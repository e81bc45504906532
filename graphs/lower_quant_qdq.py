"""Quantize weights in standard ONNX Q/DQ form (`qdq`): TensorRT's explicit-quantization contract.

    before:  y = MatMul(x, W)                          W: float initializer, matmul layout [.., K, N]

    after (int4):  W' = DequantizeLinear(Wq, scale; axis=-2, block_size=B)     # opset 21
                   y  = MatMul(x, W')
                   Wq: INT4 [.., K, N]; scale [.., ceil(K/B), N] in the compute dtype; zero point 0 (omitted)

    after (fp8):   W' = DequantizeLinear(Wq, scale; axis=-1)                     # 2-D: per output channel
                   W' = DequantizeLinear(Wq, scale; axis=-2, block_size=K)       # 3-D experts: one block = K,
                                                                                 # so one scale per (expert, column)
                   x' = DequantizeLinear(QuantizeLinear(x, s_x, zp=fp8 0), s_x, zp)   # static per-tensor scale
                   y  = MatMul(x', W')
                   Wq: FLOAT8E4M3FN; s_x from calibration (the activation's |max| / 448)

`per_expert` (TensorRT's layout; TensorRT documents blocked INT4 DequantizeLinear only on 2-D constant
weights): a stacked 3-D expert weight [E, K, N] becomes E 2-D constants, each dequantized on its own
and stacked back, so the MatMul or Gather that follows sees the compute dtype:

    W' = Concat(Unsqueeze(DequantizeLinear(Wq_0, scale_0), 0), ..., Unsqueeze(DequantizeLinear(Wq_E-1, ...), 0))
         Wq_e [K, N]; int4: scale_e [ceil(K/B), N], axis 0, block_size B; fp8: scale_e [N], axis 1

Same numbers: slice e of the stacked q and scale is exactly what the 3-D DequantizeLinear multiplies.

The reduction axis K comes from the consumer: a MatMul (directly or after a Gather of experts)
contracts the weight's second-to-last axis (its last when the gathered weight is the MatMul's left operand:
the native-layout gather, lower_moe_gather.py); ONNX Runtime's `com.microsoft.MoE` stores expert
weights [E, N, K] and contracts the last (then no activation Q/DQ can be placed inside it, which
is why fp8 never uses the `native` dispatch). Valid because DequantizeLinear computes exactly
q * scale (zero point 0), the same product the spec defines (graphs/quantize.py); the MatMul then
sees the dequantized weight. The quantized tensors are lazy: each is computed from the streamed
fp32 weight when the saver writes it, so memory stays bounded by one weight. A rule with method
`checkpoint` (a pre-quantized FP8 checkpoint) takes (q, scale) from the checkpoint's stored tensors
instead (`stored`: export/compressed_tensors.py), so its FP8 bytes go into the initializer unrounded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import ml_dtypes
import numpy as np
import onnx_ir as ir

from llama4_deploy.graphs.passes import LoweringError, RewritePass
from llama4_deploy.graphs.quantize import (
    QuantRule,
    QuantSpec,
    fp8_activation_scale,
    fp8_channel,
    int_blocked,
    numpy_dtype,
)
from llama4_deploy.graphs.streamed import StreamedTensor

WEIGHT_DTYPES = {"int4": ir.DataType.INT4, "int8": ir.DataType.INT8, "fp8": ir.DataType.FLOAT8E4M3FN}
ALREADY_QUANTIZED = ("DequantizeLinear", "MatMulNBits", "QMoE")
COMPUTE = {"float32": ir.DataType.FLOAT, "float16": ir.DataType.FLOAT16, "bfloat16": ir.DataType.BFLOAT16}


def reduction_axis(value: ir.Value) -> int | str:
    """The axis the weight's consumers contract (negative), or why it is not known."""
    axes = set()
    for user, index in value.uses():
        if user.op_type == "MatMul" and index == 1:
            axes.add(-2)
        elif (
            user.op_type == "Gather"
            and index == 0
            and all(u.op_type == "MatMul" and i == 1 for u, i in user.outputs[0].uses())
        ):
            axes.add(-2)
        elif (
            user.op_type == "Gather"
            and index == 0
            and all(  # the native-layout gather: weight on the left
                u.op_type == "MatMul" and i == 0 for u, i in user.outputs[0].uses()
            )
        ):
            axes.add(-1)
        elif user.domain == "com.microsoft" and user.op_type == "MoE" and index in (2, 4):
            axes.add(-1)
        else:
            return f"is read by {user.op_type} (input {index}), not as a MatMul weight"
    if len(axes) != 1:
        return "has no consumer" if not axes else "is contracted along different axes by its consumers"
    return axes.pop()


class QuantizedWeight:
    """The (q, scale) pair of one weight, computed once when the saver asks for either of them."""

    # the last weight quantized (held, so its identity cannot be reused): one weight at a time, O(layer) memory
    _last: tuple[QuantizedWeight, tuple[np.ndarray, np.ndarray]] | None = None

    def __init__(
        self,
        source: ir.TensorProtocol,
        rule: QuantRule,
        axis: int,
        compute_dtype: str,
        stored: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None,
    ):
        self.source, self.rule, self.axis, self.compute_dtype = source, rule, axis, compute_dtype
        self.stored = stored  # pre-quantized (q, scale) in matmul layout, scale [.., 1, N]

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        cached = QuantizedWeight._last
        if cached is not None and cached[0] is self:
            return cached[1]
        if self.stored is not None:
            q, scale = self.stored()
            if q.ndim == 2:
                scale = scale.reshape(-1)
            result = (q, scale.astype(numpy_dtype(self.compute_dtype)))
            QuantizedWeight._last = (self, result)
            return result
        w = np.asarray(self.source.numpy(), dtype=np.float32)  # no copy of an fp32 source
        axis = self.axis % w.ndim
        if self.rule.bits:
            q, scale = int_blocked(w, axis, self.rule.block_size, self.compute_dtype, bits=self.rule.bits)
            q = q.astype(ml_dtypes.int4) if self.rule.bits == 4 else q
        else:
            q, scale = fp8_channel(w, axis, self.compute_dtype)
            if w.ndim == 2:
                scale = scale.reshape(-1)  # per-axis form along the output axis
        result = (q, scale.astype(numpy_dtype(self.compute_dtype)))
        QuantizedWeight._last = (self, result)
        return result

    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        dims = tuple(int(d) for d in self.source.shape)
        axis = self.axis % len(dims)
        if self.rule.bits:
            scale = dims[:axis] + (-(-dims[axis] // self.rule.block_size),) + dims[axis + 1 :]
        elif len(dims) == 2:
            scale = (dims[1 - axis],)
        else:
            scale = dims[:axis] + (1,) + dims[axis + 1 :]
        return dims, scale

    def lazy(self, which: int, name: str, dtype: ir.DataType) -> StreamedTensor:
        shape = self.shapes()[which]

        def compute() -> ir.TensorProtocol:
            return ir.tensor(self.arrays()[which], dtype=dtype, name=name)

        return StreamedTensor(compute, dtype, shape, name)

    def slice_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(q, scale) shapes of one expert's 2-D slice of a stacked [E, K, N] weight."""
        q, scale = self.shapes()
        if self.rule.weight == "fp8":
            return q[1:], (scale[-1],)  # per output channel
        return q[1:], scale[1:]

    def lazy_slice(self, which: int, expert: int, name: str, dtype: ir.DataType) -> StreamedTensor:
        """Expert `expert`'s slice; consecutive slices of one weight reuse its cached arrays."""
        shape = self.slice_shapes()[which]

        def compute() -> ir.TensorProtocol:
            return ir.tensor(self.arrays()[which][expert].reshape(shape), dtype=dtype, name=name)

        return StreamedTensor(compute, dtype, shape, name)


def dequantize_attributes(rule: QuantRule, axis: int, rank: int, k: int) -> dict[str, int]:
    if rule.bits:
        return {"axis": axis % rank, "block_size": rule.block_size}
    if rank == 2:
        return {"axis": 1 - axis % rank}
    return {"axis": axis % rank, "block_size": k}


def quant_scope(name: str) -> str:
    """`layers.3.experts_gate_up` -> `/layers.3/quant/experts_gate_up`."""
    stamp, _, rest = name.partition(".")
    if stamp == "layers":
        index, _, rest = rest.partition(".")
        stamp = f"layers.{index}"
    return f"/{stamp}/quant/{rest}"


def quantize_weight(
    graph: ir.Graph,
    value: ir.Value,
    rule: QuantRule,
    axis: int,
    compute_dtype: str,
    stored: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None,
) -> ir.Value:
    """Replace initializer `value` by DequantizeLinear(q, scale); returns the dequantized value."""
    name = value.name
    weight = QuantizedWeight(value.const_value, rule, axis, compute_dtype, stored)
    q_shape, scale_shape = weight.shapes()
    q = ir.Value(
        name=f"{name}.{rule.weight}",
        type=ir.TensorType(WEIGHT_DTYPES[rule.weight]),
        shape=ir.Shape(q_shape),
        const_value=weight.lazy(0, f"{name}.{rule.weight}", WEIGHT_DTYPES[rule.weight]),
    )
    scale = ir.Value(
        name=f"{name}.scale",
        type=ir.TensorType(COMPUTE[compute_dtype]),
        shape=ir.Shape(scale_shape),
        const_value=weight.lazy(1, f"{name}.scale", COMPUTE[compute_dtype]),
    )
    graph.initializers.pop(name)
    graph.register_initializer(q)
    graph.register_initializer(scale)
    node = ir.node(
        "DequantizeLinear",
        [q, scale],
        dequantize_attributes(rule, axis, len(q_shape), q_shape[axis]),
        name=f"{quant_scope(name)}/DequantizeLinear",
    )
    out = node.outputs[0]
    ir.convenience.replace_all_uses_with(value, out)
    out.name, out.dtype, out.shape = f"{name}.dq", COMPUTE[compute_dtype], ir.Shape(q_shape)
    graph.insert_before(graph.node(0), node)
    return out


def quantize_weight_per_expert(
    graph: ir.Graph, value: ir.Value, rule: QuantRule, axis: int, compute_dtype: str
) -> ir.Value:
    """Replace a stacked [E, K, N] initializer by E 2-D DequantizeLinear nodes stacked back (module
    docstring); returns the stacked dequantized value [E, K, N]."""
    name = value.name
    weight = QuantizedWeight(value.const_value, rule, axis, compute_dtype)
    q_shape, _ = weight.shapes()
    (k, n), scale_shape = weight.slice_shapes()
    fmt, dtype = WEIGHT_DTYPES[rule.weight], COMPUTE[compute_dtype]
    scope = quant_scope(name)
    axis0 = ir.node(
        "Constant",
        [],
        {"value": ir.tensor(np.array([0], dtype=np.int64), name=f"{scope}/axis0")},
        name=f"{scope}/axis0",
    )
    axis0.outputs[0].name = f"{scope}/axis0"
    nodes, stacked = [axis0], []
    qs, scales = [], []
    for e in range(q_shape[0]):
        qs.append(
            ir.Value(
                name=f"{name}.{e}.{rule.weight}",
                type=ir.TensorType(fmt),
                shape=ir.Shape((k, n)),
                const_value=weight.lazy_slice(0, e, f"{name}.{e}.{rule.weight}", fmt),
            )
        )
    for e in range(q_shape[0]):  # all q slices, then all scales: each run reuses the cached arrays
        scales.append(
            ir.Value(
                name=f"{name}.{e}.scale",
                type=ir.TensorType(dtype),
                shape=ir.Shape(scale_shape),
                const_value=weight.lazy_slice(1, e, f"{name}.{e}.scale", dtype),
            )
        )
    graph.initializers.pop(name)
    for v in qs + scales:
        graph.register_initializer(v)
    for e, (q, scale) in enumerate(zip(qs, scales)):
        dq = ir.node(
            "DequantizeLinear", [q, scale], dequantize_attributes(rule, -2, 2, k), name=f"{scope}/{e}/DequantizeLinear"
        )
        dq.outputs[0].name, dq.outputs[0].dtype, dq.outputs[0].shape = f"{name}.{e}.dq", dtype, ir.Shape((k, n))
        unsqueeze = ir.node("Unsqueeze", [dq.outputs[0], axis0.outputs[0]], name=f"{scope}/{e}/Unsqueeze")
        unsqueeze.outputs[0].name = f"{name}.{e}.dq3"
        unsqueeze.outputs[0].dtype, unsqueeze.outputs[0].shape = dtype, ir.Shape((1, k, n))
        nodes += [dq, unsqueeze]
        stacked.append(unsqueeze.outputs[0])
    concat = ir.node("Concat", stacked, {"axis": 0}, name=f"{scope}/Concat")
    nodes.append(concat)
    out = concat.outputs[0]
    ir.convenience.replace_all_uses_with(value, out)
    out.name, out.dtype, out.shape = f"{name}.dq", dtype, ir.Shape(q_shape)
    graph.insert_before(graph.node(0), nodes)
    return out


def quantize_activation(graph: ir.Graph, matmul: ir.Node, scale: float, compute_dtype: str) -> None:
    """x -> DequantizeLinear(QuantizeLinear(x, s, 0), s, 0) on the MatMul's activation input."""
    x = matmul.inputs[0]
    prefix = f"{matmul.name}/act"
    s = ir.tensor(np.array(scale, dtype=numpy_dtype(compute_dtype)), name=f"{prefix}/scale")
    zero = ir.tensor(np.array(0, dtype=ml_dtypes.float8_e4m3fn), name=f"{prefix}/zero_point")
    s_node = ir.node("Constant", [], {"value": s}, name=f"{prefix}/scale")
    z_node = ir.node("Constant", [], {"value": zero}, name=f"{prefix}/zero_point")
    quant = ir.node("QuantizeLinear", [x, s_node.outputs[0], z_node.outputs[0]], name=f"{prefix}/QuantizeLinear")
    dequant = ir.node(
        "DequantizeLinear", [quant.outputs[0], s_node.outputs[0], z_node.outputs[0]], name=f"{prefix}/DequantizeLinear"
    )
    for node in (s_node, z_node, quant, dequant):
        node.outputs[0].name = node.name
    quant.outputs[0].dtype = ir.DataType.FLOAT8E4M3FN
    dequant.outputs[0].type, dequant.outputs[0].shape = x.type, x.shape
    graph.insert_before(matmul, [s_node, z_node, quant, dequant])
    matmul.replace_input_with(0, dequant.outputs[0])


def activation_consumers(dequantized: ir.Value) -> list[ir.Node]:
    """The MatMuls that multiply an activation by this (dequantized) weight, directly or after a Gather."""
    out = []
    for user, index in dequantized.uses():
        if user.op_type == "MatMul" and index == 1:
            out.append(user)
        elif user.op_type == "Gather":
            out.extend(u for u, i in user.outputs[0].uses() if u.op_type == "MatMul" and i == 1)
    return out


class QuantizeQdqPass(RewritePass):
    """Quantize every initializer the spec names that is still float; counts the weights quantized and raises
    LoweringError naming the first it cannot. `activation_amax` maps a weight name to the calibrated |max| of the
    activation it multiplies (needed by rules with fp8 activations). `per_expert`: stacked 3-D expert weights as
    E 2-D constants (TensorRT's layout, module docstring). `stored` maps a weight name to the reader of its
    pre-quantized (q, scale) (needed by rules with method `checkpoint`)."""

    name = "quantize_qdq"

    def __init__(
        self,
        spec: QuantSpec,
        activation_amax: Mapping[str, float] | None = None,
        per_expert: bool = False,
        stored: Mapping[str, Callable[[], tuple[np.ndarray, np.ndarray]]] | None = None,
    ):
        self.spec, self.activation_amax, self.per_expert, self.stored = spec, activation_amax, per_expert, stored

    def _not_quantized(self, name: str, reason: str) -> LoweringError:
        return LoweringError(f"weight {name} was not quantized to {self.spec.precision}: it {reason}")

    def rewrite(self, model: ir.Model) -> int:
        graph = model.graph
        count = 0
        float_types = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
        for name, value in list(graph.initializers.items()):
            rule = self.spec.rule_for(name)
            if (
                rule is None
                or value.dtype not in float_types
                or any(user.op_type in ALREADY_QUANTIZED for user, _ in value.uses())
            ):
                continue  # not named by the spec, or a scale of a weight quantized already
            axis = reduction_axis(value)
            if isinstance(axis, str):
                raise self._not_quantized(name, axis)
            if value.const_value is None:
                raise self._not_quantized(name, "has no value to quantize")
            if rule.zero_point:
                raise self._not_quantized(
                    name, "has asymmetric int4 blocks, whose zero points only ONNX Runtime's MatMulNBits and QMoE take"
                )
            if rule.activation == "int8_block":
                raise self._not_quantized(
                    name,
                    "needs int8 activations, which only ONNX Runtime's MatMulNBits and QMoE compute (QMoE: experts "
                    "under the native dispatch, hidden and intermediate sizes multiples of the block size)",
                )
            if rule.activation != "none" and any(u.domain == "com.microsoft" for u, _ in value.uses()):
                raise self._not_quantized(
                    name,
                    "is read by ONNX Runtime's fused MoE kernel, where its fp8 activation "
                    "cannot be quantized; use the dense, gather or capacity dispatch",
                )
            base = name.split(".native")[0]  # re-laid-out expert copies share their source's activation
            source = None
            if rule.method == "checkpoint":
                source = (self.stored or {}).get(name)
                if source is None or axis != -2:
                    raise self._not_quantized(
                        name, "is pre-quantized in the checkpoint, but not in a matmul layout its stored FP8 fits"
                    )
            if self.per_expert and len(value.shape) == 3 and axis == -2:
                if source is not None:
                    raise self._not_quantized(
                        name,
                        "is pre-quantized in the checkpoint, and TensorRT's per-expert "
                        "layout of stored FP8 experts is not built yet; build this "
                        "checkpoint for --target onnxruntime",
                    )
                dequantized = quantize_weight_per_expert(graph, value, rule, axis, self.spec.compute_dtype)
            else:
                dequantized = quantize_weight(graph, value, rule, axis, self.spec.compute_dtype, source)
            if rule.activation == "fp8_tensor":
                amax = (self.activation_amax or {}).get(base)
                if amax is None:
                    raise ValueError(f"weight {base} needs an fp8 activation scale but calibration has none for it")
                for matmul in activation_consumers(dequantized):
                    quantize_activation(
                        graph, matmul, fp8_scale(amax, self.spec.compute_dtype), self.spec.compute_dtype
                    )
            count += 1
        if count:
            graph.opset_imports[""] = max(graph.opset_imports.get("", 21), 21)
        return count


def fp8_scale(amax: float, compute_dtype: str) -> float:
    return fp8_activation_scale(amax, compute_dtype)
