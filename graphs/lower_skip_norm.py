"""Fuse a residual add and the RMS norm reading it into ONNX Runtime's com.microsoft.SkipSimplifiedLayerNormalization:
part of the gqa form (the ONNX Runtime kernels' form, graphs/lower_attention_gqa.py), one kernel where there were
seven nodes, at every decoder layer's post-attention norm (the add and the norm in one layer).

    before:  h = Add(a, b)                                                  # the residual stream
             y = Mul(Div(h, Sqrt(Add(ReduceMean(Pow(h, 2), axes=[-1], keepdims=1), eps))), w)   # w [H], a weight
             ... other readers of h (the next residual add, a graph output)

    after:   y, _, _, h = SkipSimplifiedLayerNormalization(a, b, w; epsilon=eps)   # output 3: a + b

Why it is exact: the kernel computes s = input + skip, then s / sqrt(mean(s^2 over the last axis) + epsilon) * gamma
and returns s as its fourth output: the same expression, h included, with only the order of the floating-point sums
(and the kernel's accumulation width) differing. The first layer's input norm reads no Add and the QK norms have no
weight; ONNX Runtime fuses the former into SimplifiedLayerNormalization itself and they are left alone. So are a
layer's last add and the next layer's (or the head's) input norm: the MoE dispatch planner prices one layer per kind
for all of them (llama4_deploy/build/stage_graphs.py, CostingLayers), which holds only while every layer of a kind
has the same nodes, and the first layer's input norm reads the embedding, not an add.

`check` says why a candidate did not match, so a run that fuses nothing can be read.
"""

from __future__ import annotations

import re

import numpy as np
import onnx_ir as ir

from llama4_deploy.graphs.passes import RewritePass

CONTRIB = "com.microsoft"
_LAYER = re.compile(r"/layers\.\d+/")
FUSED = "SkipSimplifiedLayerNormalization"


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """The value's array if it is a constant (initializer or Constant node), else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Constant" and "value" in node.attributes:
        return node.attributes["value"].as_tensor().numpy()
    return None


def _only_use(value: ir.Value, op_type: str, index: int | None = None) -> ir.Node | None:
    """The single node reading `value`, if it is an `op_type` reading it at input `index` (any index if None)."""
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    node, at = uses[0]
    return node if node.op_type == op_type and node.domain == "" and (index is None or at == index) else None


def match(add: ir.Node) -> tuple[list[ir.Node], float, ir.Value] | str:
    """(the norm's nodes Pow ... Mul, epsilon, weight) reading `add`'s output, or why they do not fuse."""
    h = add.outputs[0]
    readers = {node.op_type: node for node, _ in h.uses()}
    pow_, div = readers.get("Pow"), readers.get("Div")
    if pow_ is None or div is None or pow_.inputs[0] is not h or div.inputs[0] is not h:
        return "its sum is not read by an RMS norm (Pow and Div)"
    exponent = _constant(pow_.inputs[1])
    if exponent is None or exponent.size != 1 or float(exponent) != 2.0:
        return "the norm squares by something other than the constant 2"
    mean = _only_use(pow_.outputs[0], "ReduceMean", 0)
    axes = _constant(mean.inputs[1]) if mean is not None and len(mean.inputs) > 1 else None
    rank = len(h.shape) if h.shape is not None else None
    if mean is None or axes is None or rank is None or [int(a) % rank for a in axes.ravel()] != [rank - 1]:
        return "the norm's mean is not over the last axis alone"
    if mean.attributes.get("keepdims") is not None and mean.attributes["keepdims"].as_int() != 1:
        return "the norm's mean drops its axis"
    plus = _only_use(mean.outputs[0], "Add")
    eps = _constant(plus.inputs[1] if plus is not None and plus.inputs[0] is mean.outputs[0] else None)
    if plus is None or eps is None or eps.size != 1:
        return "the norm's epsilon is not a constant scalar"
    sqrt = _only_use(plus.outputs[0], "Sqrt")
    if sqrt is None or _only_use(sqrt.outputs[0], "Div", 1) is not div:
        return "the norm does not divide by the square root of its mean"
    scale = _only_use(div.outputs[0], "Mul")
    if scale is None:
        return "the norm has no weight (a QK norm)"
    weight = scale.inputs[1] if scale.inputs[0] is div.outputs[0] else scale.inputs[0]
    width = h.shape[-1] if h.shape is not None else None
    if not weight.is_initializer() or weight.shape is None or list(weight.shape) != [width]:
        return f"the norm's weight is not a [{width}] initializer"
    layer_of = lambda node: (_LAYER.match(node.name or "") or [None])[0]  # noqa: E731
    if layer_of(add) is None or layer_of(add) != layer_of(scale):
        return "the add and the norm are not in one layer"
    return [pow_, mean, plus, sqrt, div, scale], float(eps.ravel()[0]), weight


class FuseSkipNormPass(RewritePass):
    """Fuse every residual add whose sum an RMS norm with a weight reads; returns the count."""

    name = "fuse_skip_norm"

    def __init__(self):
        self.skipped: dict[str, str] = {}  # Add node name -> why it was left alone (candidates with a Pow reader)

    def rewrite(self, model: ir.Model) -> int:
        graph = model.graph
        candidates = [
            node
            for node in graph
            if node.op_type == "Add"
            and node.domain == ""
            and any(u.op_type == "Pow" for u, _ in node.outputs[0].uses())
        ]
        count = 0
        for add in candidates:
            found = match(add)
            if isinstance(found, str):
                self.skipped[add.name or ""] = found
                continue
            norm, eps, weight = found
            scale = norm[-1]
            tape = ir.tape.Tape()
            y, _, _, total = tape.op_multi_out(
                FUSED,
                [add.inputs[0], add.inputs[1], weight],
                {"epsilon": eps},
                domain=CONTRIB,
                num_outputs=4,
                name=f"{add.name or 'add'}/skip_norm",  # the add's name is unique, a layer has two
            )
            graph.insert_before(add, tape.nodes)
            for old, new in ((scale.outputs[0], y), (add.outputs[0], total)):
                new.dtype, new.shape = old.dtype, old.shape
                label, old.name = old.name, None
                ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
                new.name = label
            graph.remove([*reversed(norm), add], safe=True)
            count += 1
        if count:
            graph.opset_imports[CONTRIB] = 1
        return count
