"""The quantize stage: the passes a spec's form runs, in order, after the MoE and attention lowerings.

    ort form:  quantize_ort (MatMulNBits, QMoE)  then  quantize_qdq (whatever the kernels cannot take)
    qdq form:  quantize_qdq

The qdq pass refuses (LoweringError, one sentence) a spec weight that neither pass could quantize.
"""

from __future__ import annotations

from collections.abc import Mapping

from llama4_deploy.graphs.lower_quant_ort import OrtQuantConfig, QuantizeOrtPass
from llama4_deploy.graphs.lower_quant_qdq import QuantizeQdqPass
from llama4_deploy.graphs.passes import RewritePass
from llama4_deploy.graphs.quantize import QuantSpec


def quantize_passes(
    spec: QuantSpec,
    activation_amax: Mapping[str, float] | None = None,
    ort: OrtQuantConfig | None = None,
    per_expert: bool = False,
    stored: Mapping | None = None,
) -> list[RewritePass]:
    """Empty for an unquantized spec. `per_expert`: stacked expert weights as 2-D constants, one DequantizeLinear
    each (TensorRT). `stored`: pre-quantized (q, scale) readers by weight name (export/compressed_tensors.py)."""
    if not spec.quantized:
        return []
    qdq = QuantizeQdqPass(spec, activation_amax, per_expert=per_expert, stored=stored)
    return [QuantizeOrtPass(spec, ort), qdq] if spec.form == "ort" else [qdq]
