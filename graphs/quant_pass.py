"""The quantize stage: the passes a spec's form runs, in order, after the MoE and attention lowerings.

    ort form:  lower_quant_ort (MatMulNBits, QMoE)  then  lower_quant_qdq (whatever the kernels cannot take)
    qdq form:  lower_quant_qdq

Returns {pass: count} for the build's pass table, and refuses (ValueError, one sentence) a spec
weight that neither pass could quantize.
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx_ir as ir

from llama4_deploy.graphs.lower_quant_ort import OrtQuantConfig, lower_quant_ort
from llama4_deploy.graphs.lower_quant_qdq import lower_quant_qdq
from llama4_deploy.graphs.quantize import QuantSpec


def quantize_model(model: ir.Model, spec: QuantSpec, activation_amax: Mapping[str, float] | None = None,
                   ort: OrtQuantConfig = OrtQuantConfig(), per_expert: bool = False,
                   stored: Mapping | None = None) -> dict[str, int]:
    """`per_expert`: stacked expert weights as 2-D constants, one DequantizeLinear each (TensorRT).
    `stored`: pre-quantized (q, scale) readers by weight name (export/compressed_tensors.py)."""
    if not spec.quantized:
        return {}
    counts = {}
    if spec.form == "ort":
        counts["quantize_ort"], _ = lower_quant_ort(model, spec, ort)
    counts["quantize_qdq"], skipped = lower_quant_qdq(model, spec, activation_amax, per_expert=per_expert,
                                                      stored=stored)
    if skipped:
        name, reason = next(iter(skipped.items()))
        raise ValueError(f"weight {name} was not quantized to {spec.precision}: it {reason}")
    return counts
