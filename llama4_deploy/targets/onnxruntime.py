"""The ONNX Runtime target (the default): every form ONNX Runtime runs, its contrib kernels included.

attention      gqa (GroupQueryAttention over the cache written in place, norms fused) unless --attention onnx23
               or decomposed
MoE dispatch   auto: priced among dense, gather, capacity and native (com.microsoft.MoE) at a CPU's balance
quantization   int4: ort (MatMulNBits, QMoE) unless --quant-form qdq, by default with blocks of 32 and int8
               activations (accuracy_level 4; float where a pinned MoE dispatch is not native); fp8: qdq
"""

from __future__ import annotations

from llama4_deploy.graphs.dispatch import STRATEGIES, DispatchRules, Machine
from llama4_deploy.graphs.quantize import QuantSpec
from llama4_deploy.targets.base import Target


class OnnxRuntimeTarget(Target):
    name = "onnxruntime"
    # priced at a 2-core AVX2 CPU's fp32 balance; ScatterND's reduction combines capacity slots
    dispatch = DispatchRules(name, STRATEGIES, Machine(60e9, 15e9), capacity_combine="scatter_add")
    attention_auto = "gqa"
    int4_form = "ort"

    def dispatch_refusals(self, spec: QuantSpec) -> dict[str, str]:
        refusals = super().dispatch_refusals(spec)
        if spec.compute_dtype == "float16":
            refusals["capacity"] = (
                "ONNX Runtime's CPU has no float16 ScatterND with reduction add, which the "
                "capacity dispatch combines expert outputs with; use --moe-dispatch dense, "
                "gather, native or auto"
            )
        return refusals


TARGET = OnnxRuntimeTarget()
