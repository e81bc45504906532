"""Run a linked fp32 graph in a narrower compute dtype (float16 or bfloat16).

    before:  every float tensor float32: weights, caches, activations, logits
    after:   weights, caches, activations and logits in the compute dtype, except the prologue:
               position_ids ──Cast(float32)──► RoPE angles, cos/sin, temperature (float32)
               prologue.rope_cos ──Cast(float16)──► layers            # one Cast per float prologue output
             initializers re-typed lazily (converted when the saver writes them)

Why the prologue stays float32: RoPE angles are position * frequency; float16 holds positions
exactly only up to 2048 and the angle's error grows with the position, so angles, cos and sin
are computed in float32 and only their values in [-1, 1] (and the temperature scale) are
narrowed. Everything else is a re-typing: each op computes the same function in the narrower
type, and the constants the exporter wrote (RMS norm's eps, the RoPE pair rotation of +-1)
round to the nearest value of that type. Run before the MoE and attention lowerings, so their
own constants (the masking floor, the router's "lowest" value) are made for the compute dtype.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from llama4_deploy.graphs.passes import FormPass
from llama4_deploy.graphs.quantize import numpy_dtype
from llama4_deploy.graphs.streamed import StreamedTensor

DTYPES = {"float16": ir.DataType.FLOAT16, "bfloat16": ir.DataType.BFLOAT16}
PROLOGUE = "/prologue/"


def narrowed(source: ir.TensorProtocol, compute_dtype: str) -> StreamedTensor:
    """`source` in the compute dtype, converted only when read."""
    target = numpy_dtype(compute_dtype)

    def convert() -> ir.TensorProtocol:
        return ir.tensor(source.numpy().astype(np.float32).astype(target), name=source.name)

    return StreamedTensor(convert, DTYPES[compute_dtype], source.shape, source.name)


def _narrow_attribute_tensor(node: ir.Node, compute_dtype: str) -> bool:
    attr = node.attributes.get("value")
    if attr is None or attr.type != ir.AttributeType.TENSOR or attr.as_tensor().dtype != ir.DataType.FLOAT:
        return False
    tensor = attr.as_tensor()
    node.attributes["value"] = ir.AttrTensor(
        "value", ir.tensor(tensor.numpy().astype(numpy_dtype(compute_dtype)), name=tensor.name)
    )
    return True


class ComputeDtypePass(FormPass):
    """Re-type the graph to a compute dtype; counts the initializers, nodes and graph inputs/outputs changed
    (none for float32)."""

    forms, family, what = ("float32", *DTYPES), "compute_dtype", "compute dtype"

    def rewrite(self, model: ir.Model) -> int:
        compute_dtype = self.form
        if compute_dtype == "float32":
            return 0
        target = DTYPES[compute_dtype]
        graph = model.graph
        changed = 0
        for name, value in graph.initializers.items():
            if value.dtype == ir.DataType.FLOAT and not name.startswith("prologue."):
                value.const_value = narrowed(value.const_value, compute_dtype)
                value.type = ir.TensorType(target)
                changed += 1
        for value in graph.inputs:
            if value.dtype == ir.DataType.FLOAT:
                value.type = ir.TensorType(target)
                changed += 1
        prologue_outputs: list[ir.Value] = []
        for node in list(graph):
            if node.name.startswith(PROLOGUE):
                prologue_outputs.extend(
                    v
                    for v in node.outputs
                    if v.dtype == ir.DataType.FLOAT and any(not user.name.startswith(PROLOGUE) for user, _ in v.uses())
                )
                continue
            touched = False
            if node.op_type == "Cast" and node.attributes["to"].as_int() == ir.DataType.FLOAT:
                node.attributes["to"] = ir.AttrInt64("to", target)
                touched = True
            if node.op_type in ("Constant", "ConstantOfShape"):
                touched |= _narrow_attribute_tensor(node, compute_dtype)
            for value in node.outputs:
                if value.dtype == ir.DataType.FLOAT:
                    value.type = ir.TensorType(target)
                    touched = True
            changed += touched
        for value in prologue_outputs:
            users = [(user, index) for user, index in value.uses() if not user.name.startswith(PROLOGUE)]
            cast = ir.node("Cast", [value], {"to": target}, name=f"{value.producer().name}/CastCompute")
            cast.outputs[0].name = f"{value.name}.{compute_dtype}"
            cast.outputs[0].type = ir.TensorType(target)
            cast.outputs[0].shape = value.shape
            graph.insert_after(value.producer(), cast)
            for user, index in users:
                user.replace_input_with(index, cast.outputs[0])
            changed += 1
        return changed
