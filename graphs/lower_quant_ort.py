"""Quantize weights into ONNX Runtime's 4-bit kernels (`ort`): the fast CPU form of an int4 spec.

    before:  y = MatMul(x, W)                                   W [K, N] float, matmul layout
    after:   y = com.microsoft.MatMulNBits(x, B, scales; K, N, bits=4, block_size=Bk, accuracy_level)
             B      [N, ceil(K/Bk), Bk/2] uint8   column n's int4 values q + 8, two per byte, low nibble first
             scales [N, ceil(K/Bk)]               in the compute dtype

    before:  y = MatMul(x, W)                                   W [K, N], a rule with weight int8 (--int8-weights)
    after:   y = com.microsoft.MatMulNBits(x, B, scales; K, N, bits=8, block_size=Bk, accuracy_level)
             B      [N, ceil(K/Bk), Bk] uint8                   column n's int8 values q + 128, one per byte

    before:  y = com.microsoft.MoE(x, picks, fc1, None, fc2; k, swiglu, ...)     (lower_moe_native.py)
    after:   y = com.microsoft.QMoE(x, picks, fc1q, fc1_scales, None, fc2q, fc2_scales;
                                    same attributes, expert_weight_bits=4, block_size=Bk[, accuracy_level=4])
             fc1q [E, 2I, H/2] uint8, fc1_scales [E, 2I, H/Bk]; fc2q [E, H, I/2], fc2_scales [E, H, I/Bk]

Valid because both kernels dequantize (stored - 8) * scale with the default zero point 8 for
4 bits, and MatMulNBits (stored - 128) * scale with the default 128 for 8 bits (the contrib op
docs for onnxruntime 1.32), which is exactly q * scale of the spec's symmetric int4 and int8
(graphs/quantize.py): the same numbers as the qdq form, in one fused kernel that
reads 4-bit weights. accuracy_level 0 keeps activations in their dtype; a rule with activation
`int8_block` (--int4-compute int8) sets 4, where the kernel quantizes its input to int8 per row
and block (graphs/quantize.py fake_quant_int8_blocks) and runs int8 dot products: the fast CPU
kernels, with numbers the simulation models. QMoE takes the same attribute (ONNX Runtime 1.32's
schema: "for block-wise 4-bit experts, 0 or 1 keeps fp32 activations and 4 allows int8
activations"): its CPU kernel (contrib_ops/cpu/moe/moe_quantization_cpu.cc) runs each expert's
fc1 and fc2 as MatMulNBits' MLAS GEMM (MlasQNBitGemmBatch, compute type SQNBIT_CompInt8) over the
gathered rows, so fc1's input (each routed token's row, here x * sigmoid(score)) and fc2's input
(the SwiGLU output of that row) are each quantized per row and block of K exactly as MatMulNBits
quantizes its input. The kernel takes that path only with prepacked, block-wise weights whose
scales are initializers (what this pass writes; verify and the golden step prepack).

Not lowered here, by design (not an error: lower_quant_qdq.py, the pass after this one, quantizes them):
weights with other consumers, 3-D weights outside the MoE kernel, and QMoE experts whose hidden or
intermediate size is not a multiple of the block (the kernel requires both).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from pydantic import BaseModel, ConfigDict

from llama4_deploy.graphs.lower_quant_qdq import COMPUTE, QuantizedWeight, quant_scope
from llama4_deploy.graphs.passes import RewritePass
from llama4_deploy.graphs.quantize import (
    QuantRule,
    QuantSpec,
    int4_blocked_asymmetric,
    numpy_dtype,
    pack_int4_rows,
    pack_int8_rows,
    pack_uint4,
    pack_zero_points,
)
from llama4_deploy.graphs.rewrite import splice
from llama4_deploy.graphs.streamed import StreamedTensor

MS_DOMAIN = "com.microsoft"


class OrtQuantConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    accuracy_level: int = 0  # 0: activations stay in the compute dtype (the spec's numbers)


class _Asymmetric:
    """(u, scale, zero) of one weight in the kernels' [.., N, K] layout, computed once for its three tensors."""

    _last: tuple[_Asymmetric, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None

    def __init__(self, source: ir.TensorProtocol, rule: QuantRule, axis: int, compute_dtype: str):
        self.source, self.rule, self.axis, self.compute_dtype = source, rule, axis, compute_dtype

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if _Asymmetric._last is not None and _Asymmetric._last[0] is self:
            return _Asymmetric._last[1]
        w = np.asarray(self.source.numpy(), dtype=np.float32)
        u, scale, zero = int4_blocked_asymmetric(w, self.axis, self.rule.block_size, self.compute_dtype)
        if self.axis % w.ndim == w.ndim - 2:  # matmul layout [K, N]: the kernels want [N, K]
            u, scale, zero = (np.swapaxes(a, -1, -2) for a in (u, scale, zero))
        result = (u, scale, zero)
        _Asymmetric._last = (self, result)
        return result


def _packed(source: ir.TensorProtocol, rule: QuantRule, compute_dtype: str, axis: int, name: str, flat: bool = False):
    """Lazy (B, scales) in the kernels' [.., N, K] layout from a weight quantized along `axis`, and the packed zero
    points [.., N, ceil(blocks / 2)] of an asymmetric rule (else None); `flat`: B as [.., N, K/2] (QMoE) instead of
    [.., N, blocks, block/2] (MatMulNBits)."""
    weight = QuantizedWeight(source, rule, axis, compute_dtype)
    asymmetric = _Asymmetric(source, rule, axis, compute_dtype) if rule.zero_point else None
    dims = tuple(int(d) for d in source.shape)
    k = dims[axis]
    blocks = -(-k // rule.block_size)
    if axis % len(dims) == len(dims) - 2:  # matmul layout [K, N]: the kernel wants [N, K]
        out_dims = dims[:-2] + (dims[-1],)
    else:
        out_dims = dims[:-1]
    per_byte = 8 // rule.bits
    b_shape = out_dims + ((blocks * rule.block_size // per_byte,) if flat else (blocks, rule.block_size // per_byte))

    def b() -> ir.TensorProtocol:
        if asymmetric is not None:
            packed = pack_uint4(asymmetric.arrays()[0], rule.block_size)
            return ir.tensor(np.ascontiguousarray(packed.reshape(b_shape)), name=f"{name}.q4")
        q, _ = weight.arrays()
        q = np.asarray(q.astype(np.int8))
        if axis % q.ndim == q.ndim - 2:
            q = np.swapaxes(q, -1, -2)
        packed = (pack_int8_rows if rule.bits == 8 else pack_int4_rows)(q, rule.block_size)
        return ir.tensor(np.ascontiguousarray(packed.reshape(b_shape)), name=f"{name}.q{rule.bits}")

    def scales() -> ir.TensorProtocol:
        if asymmetric is not None:
            s = asymmetric.arrays()[1]
        else:
            _, s = weight.arrays()
            if axis % s.ndim == s.ndim - 2:
                s = np.swapaxes(s, -1, -2)
        return ir.tensor(np.ascontiguousarray(s.astype(numpy_dtype(compute_dtype))), name=f"{name}.q4_scales")

    def zero_points() -> ir.TensorProtocol:
        return ir.tensor(np.ascontiguousarray(pack_zero_points(asymmetric.arrays()[2])), name=f"{name}.q4_zero_points")

    compute = COMPUTE[compute_dtype]
    zp_shape = out_dims + (-(-blocks // 2),)
    return (
        StreamedTensor(b, ir.DataType.UINT8, b_shape, f"{name}.q4"),
        StreamedTensor(scales, compute, out_dims + (blocks,), f"{name}.q4_scales"),
        StreamedTensor(zero_points, ir.DataType.UINT8, zp_shape, f"{name}.q4_zero_points") if asymmetric else None,
    )


def _register(graph: ir.Graph, tensor: StreamedTensor) -> ir.Value:
    value = ir.Value(name=tensor.name, type=ir.TensorType(tensor.dtype), shape=tensor.shape, const_value=tensor)
    graph.register_initializer(value)
    return value


def _matmul_check(value: ir.Value, rule: QuantRule) -> str | None:
    uses = value.uses()
    if len(uses) != 1 or uses[0][0].op_type != "MatMul" or uses[0][1] != 1:
        return "is not the weight of exactly one MatMul"
    if len(value.shape) != 2:
        return f"is {len(value.shape)}-D; MatMulNBits takes 2-D weights"
    return None


def _moe_check(node: ir.Node, rule: QuantRule) -> str | None:
    fc1, fc2 = node.inputs[2], node.inputs[4]
    if any(v is None or v.const_value is None or len(v.uses()) != 1 for v in (fc1, fc2)):
        return "has expert weights that are not initializers read only by it"
    hidden, inter = int(fc1.shape[2]), int(fc2.shape[2])
    if hidden % rule.block_size or inter % rule.block_size:
        return (
            f"has hidden size {hidden} and expert intermediate size {inter}; QMoE needs both to be "
            f"multiples of the block size {rule.block_size}"
        )
    return None


class QuantizeOrtPass(RewritePass):
    """MatMul -> MatMulNBits and MoE -> QMoE where the spec says int4; counts the nodes replaced. What the kernels
    cannot take is left as it is, for the qdq pass after this one (module docstring)."""

    name = "quantize_ort"

    def __init__(self, spec: QuantSpec, config: OrtQuantConfig | None = None):
        self.spec, self.config = spec, config or OrtQuantConfig()

    def rewrite(self, model: ir.Model) -> int:
        graph = model.graph
        count = 0
        for name, value in list(graph.initializers.items()):
            rule = self.spec.rule_for(name)
            if rule is None or not rule.bits or value.const_value is None:
                continue
            if any(u.domain == MS_DOMAIN for u, _ in value.uses()):
                continue  # expert weights of the MoE kernel: below
            if _matmul_check(value, rule):
                continue  # left to lower_quant_qdq (module docstring)
            matmul = value.uses()[0][0]
            k, n = (int(d) for d in value.shape)
            b, scales, zero_points = _packed(value.const_value, rule, self.spec.compute_dtype, 0, name)
            tape = ir.tape.Tape()
            zp = [_register(graph, zero_points)] if zero_points is not None else []
            out = tape.op(
                "MatMulNBits",
                [matmul.inputs[0], _register(graph, b), _register(graph, scales), *zp],
                {
                    "K": k,
                    "N": n,
                    "bits": rule.bits,
                    "block_size": rule.block_size,
                    "accuracy_level": 4 if rule.activation == "int8_block" else self.config.accuracy_level,
                },
                domain=MS_DOMAIN,
                name=f"{quant_scope(name)}/MatMulNBits",
            )
            out.type, out.shape = matmul.outputs[0].type, matmul.outputs[0].shape
            splice(graph, matmul, tape, out)
            graph.initializers.pop(name)
            count += 1
        for node in [n for n in graph if n.domain == MS_DOMAIN and n.op_type == "MoE"]:
            fc1, fc2 = node.inputs[2], node.inputs[4]
            rule = self.spec.rule_for(fc1.name) if fc1 is not None else None
            if rule is None or rule.weight != "int4":
                continue
            if _moe_check(node, rule):
                continue  # left to lower_quant_qdq (module docstring)
            fc1_q, fc1_s, fc1_z = _packed(fc1.const_value, rule, self.spec.compute_dtype, 2, fc1.name, flat=True)
            fc2_q, fc2_s, fc2_z = _packed(fc2.const_value, rule, self.spec.compute_dtype, 2, fc2.name, flat=True)
            # inputs 7-10 (fc2 bias, fc3 weights, scales, bias) absent; 11, 12: an asymmetric rule's zero points
            zero_points = [None, None, None, None, _register(graph, fc1_z), _register(graph, fc2_z)] if fc1_z else []
            attributes = {a.name: a for a in node.attributes.values()}
            attributes["expert_weight_bits"] = ir.AttrInt64("expert_weight_bits", 4)
            attributes["block_size"] = ir.AttrInt64("block_size", rule.block_size)
            if rule.activation == "int8_block":  # int8 inputs to both expert matmuls (module docstring)
                attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", 4)
            tape = ir.tape.Tape()
            out = tape.op(
                "QMoE",
                [
                    node.inputs[0],
                    node.inputs[1],
                    _register(graph, fc1_q),
                    _register(graph, fc1_s),
                    None,
                    _register(graph, fc2_q),
                    _register(graph, fc2_s),
                    *zero_points,
                ],
                attributes,
                domain=MS_DOMAIN,
                name=node.name.rsplit("/", 1)[0] + "/QMoE",
            )
            out.type, out.shape = node.outputs[0].type, node.outputs[0].shape
            splice(graph, node, tape, out)
            for value in (fc1, fc2):
                graph.initializers.pop(value.name)
            count += 1
        if count:
            graph.opset_imports[MS_DOMAIN] = 1
        return count
