"""Every MoE dispatch x precision, on one MoE layer (transformers' Llama4TextMoe, E=8, H=64, I=32): each lowering
(dense, gather, capacity, native) in fp16, fp8 (qdq) and int4 (qdq and ort forms, the ort form also with int8
activations) against a PyTorch fake-quant
simulation of the same spec, or the one-sentence refusal the build gives (fp8 x native: no place for the activation
Q/DQ inside ONNX Runtime's fused MoE kernel; fp16 x capacity: ONNX Runtime's CPU has no float16 ScatterND-add, and
the graph indeed fails there, which the test also checks).

Tolerance: verify.SIMULATION_TOLERANCE x max(1, max |y|), by compute dtype (float32: the same dequantized weights,
summation order and an occasional neighbouring fp8 activation value; float16: 11-bit activations), the bound the
whole-model verify uses. The int4 ort form under native dispatch is ONNX Runtime's QMoE (block 32 divides H and I);
under the others its experts fall through to blocked DequantizeLinear and the shared expert is MatMulNBits. With int8
activations (--int4-compute int8) QMoE runs accuracy_level 4 and the simulation rounds both expert matmul inputs to
int8 per row and block, as the shared expert's MatMulNBits inputs; the other dispatches are refused (their experts'
DequantizeLinear -> MatMul would compute in float).
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from llama4_deploy import targets
from llama4_deploy.export.observe import experts_forward
from llama4_deploy.graphs.compute_dtype import ComputeDtypePass
from llama4_deploy.graphs.lower_moe_capacity import CapacityConfig, LowerMoeCapacityPass
from llama4_deploy.graphs.lower_moe_dense import LowerMoeDensePass
from llama4_deploy.graphs.lower_moe_gather import LowerMoeGatherPass
from llama4_deploy.graphs.lower_moe_native import LowerMoeNativePass
from llama4_deploy.graphs.passes import LoweringError, run_passes
from llama4_deploy.graphs.quant_pass import quantize_passes
from llama4_deploy.graphs.quantize import (
    QuantConfig,
    fake_quant,
    fake_quant_activation,
    fake_quant_int8_blocks,
    fp8_activation_scale,
    make_spec,
)
from llama4_deploy.quality.verify import SIMULATION_TOLERANCE
from tests.graphs.moe_fixtures import hf_moe, moe_model, run_ort, transformers_output

E, H, I, TOKENS = 8, 64, 32, 12
PATTERNS = ("gate_up", "down", "shared_*")  # the one-layer fixture's weight names
LOWER = {
    "dense": LowerMoeDensePass(),
    "gather": LowerMoeGatherPass(),
    "capacity": LowerMoeCapacityPass(CapacityConfig(capacity_factor=E)),  # never overflows
    "native": LowerMoeNativePass(split=1),
}
SHARED = {"shared_gate": "gate_proj", "shared_up": "up_proj", "shared_down": "down_proj"}


def _preset(choice: str):
    precision, form, compute = (choice.split("-") + ["", ""])[:3]
    return make_spec(
        QuantConfig(precision=precision, block_size=32, form=form or "auto", int4_compute=compute or "float")
    )


def _spec(choice: str, expert_activation: str | None = None):
    """The preset of `choice` on the fixture's weight names; `expert_activation` replaces the experts' activation
    (a rule of their own)."""
    spec = _preset(choice)
    rules = tuple(r.model_copy(update={"patterns": PATTERNS}) for r in spec.rules)
    if expert_activation is not None:
        (rule,) = rules
        rules = (
            rule.model_copy(update={"patterns": PATTERNS[:2], "activation": expert_activation}),
            rule.model_copy(update={"patterns": PATTERNS[2:]}),
        )
    return spec.model_copy(update={"rules": rules})


def _inputs(moe, x):
    """Every quantized weight's input activation in fp32 ({fixture weight name: tensor}), for fp8 calibration."""
    seen: dict[str, float] = {}

    def record(name, t):
        seen[name] = max(seen.get(name, 0.0), float(t.abs().max()))
        return t

    _hook(moe, record)
    transformers_output(moe, x)
    return seen


def _hook(moe, transform):
    """transform(name, activation) on every quantized weight's input: shared expert Linears and both expert matmuls."""
    handles = [
        getattr(moe.shared_expert, module).register_forward_pre_hook(
            lambda m, args, n=name: (transform(n, args[0]),) + args[1:]
        )
        for name, module in SHARED.items()
    ]
    names = {"x.experts_gate_up": "gate_up", "x.experts_down": "down"}
    moe.experts._record = ("x", lambda name, t: transform(names[name], t))
    moe.experts.forward = types.MethodType(experts_forward, moe.experts)
    return handles


def _simulate(moe, spec, amax):
    """moe with the spec's fake-quant weights (reduction axis: experts' K, the Linear's in) and fp8 activations."""
    with torch.no_grad():
        if spec.quantized:
            for name, param in (("gate_up", moe.experts.gate_up_proj), ("down", moe.experts.down_proj)):
                param.copy_(torch.from_numpy(fake_quant(param.numpy(), spec.rule_for(name), 1)))
            for name, module in SHARED.items():
                w = getattr(moe.shared_expert, module).weight
                w.copy_(torch.from_numpy(fake_quant(w.numpy(), spec.rule_for(name), 1)))

    def int8(name, t):
        rule = spec.rule_for(name)
        if rule is None or rule.activation != "int8_block":
            return t
        return torch.from_numpy(fake_quant_int8_blocks(t.detach().numpy(), rule.block_size))

    if spec.int8_activations:  # MatMulNBits and QMoE (accuracy_level 4): int8 inputs per row and block
        _hook(moe, int8)
    if spec.activations:
        scales = {name: fp8_activation_scale(value) for name, value in amax.items()}
        _hook(moe, lambda name, t: torch.from_numpy(fake_quant_activation(t.detach().numpy(), scales[name])))
    return moe


@pytest.mark.parametrize("choice", ["fp16", "fp8", "int4-qdq", "int4-ort", "int4-ort-int8"])
@pytest.mark.parametrize("dispatch", list(LOWER))
def test_dispatch_x_precision(dispatch, choice):
    moe, weights = hf_moe(E, H, I, seed=1)
    x = np.random.default_rng(2).normal(size=(TOKENS, H)).astype(np.float32)
    spec = _spec(choice)
    amax = _inputs(hf_moe(E, H, I, seed=1)[0], x) if spec.activations else None
    model = moe_model(weights, H, token_valid=True)
    ComputeDtypePass(spec.compute_dtype)(model)
    assert LOWER[dispatch](model).count == 1
    refusals = targets.get("onnxruntime").dispatch_refusals(_preset(choice))  # the preset names the build's weights
    if choice == "fp16" and dispatch == "capacity":
        assert refusals["capacity"].startswith("ONNX Runtime's CPU has no float16 ScatterND with reduction add")
        with pytest.raises(Exception, match="MLFloat16 data type is not supported with ScatterND"):
            run_ort(model, x=x.astype(np.float16), token_valid=np.ones(TOKENS, bool))
        return
    int8_experts = choice == "int4-ort-int8"
    assert (dispatch in refusals) == ((choice, dispatch) == ("fp8", "native") or int8_experts and dispatch != "native")
    if int8_experts and dispatch != "native":  # only QMoE computes int8 expert activations
        assert refusals[dispatch].startswith("int8 expert activations (--int4-compute int8) are ONNX Runtime's QMoE")
        with pytest.raises(LoweringError, match="^weight gate_up.* it needs int8 activations, which only ONNX Runtime"):
            run_passes(model, quantize_passes(spec))
        return
    if spec.activations and dispatch == "native":
        assert refusals["native"].startswith("precision fp8 quantizes expert activations")
        amax = {n: 1.0 for n in ("gate_up", "down", "shared_gate", "shared_up", "shared_down")}
        with pytest.raises(
            LoweringError,
            match="^weight gate_up.native_fc1 was not quantized to fp8: it is read by "
            "ONNX Runtime's fused MoE kernel, where its fp8 activation cannot be "
            "quantized",
        ):
            run_passes(model, quantize_passes(spec, amax))
        return
    counts = run_passes(model, quantize_passes(spec, amax))
    ops = {n.op_type for n in model.graph}
    if spec.quantized:
        assert (
            sum(counts.values()) == 5
            if dispatch != "native" or not choice.startswith("int4-ort")
            else counts["quantize_ort"] == 4
        )
    if choice.startswith("int4-ort"):
        assert "MatMulNBits" in ops and (("QMoE" in ops) == (dispatch == "native"))
    if choice == "fp8":
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    dtype = np.float16 if spec.compute_dtype == "float16" else np.float32
    got = run_ort(model, x=x.astype(dtype), token_valid=np.ones(TOKENS, bool))["y"].astype(np.float32)
    expected = transformers_output(_simulate(moe, spec, amax), x)
    tolerance = SIMULATION_TOLERANCE[spec.compute_dtype] * max(1.0, float(np.abs(expected).max()))
    assert np.abs(got - expected).max() <= tolerance, (np.abs(got - expected).max(), tolerance)
    if spec.quantized:  # the simulation is of the quantization, not of fp32
        assert np.abs(transformers_output(hf_moe(E, H, I, seed=1)[0], x) - expected).max() > 10 * tolerance
    if int8_experts:  # QMoE rounds both expert inputs to int8: float experts miss (by 0.31, the bound 0.068)
        (qmoe,) = [n for n in model.graph if n.op_type == "QMoE"]
        assert qmoe.attributes["accuracy_level"].as_int() == 4
        float_experts = transformers_output(_simulate(hf_moe(E, H, I, seed=1)[0], _spec(choice, "none"), amax), x)
        assert np.abs(got - float_experts).max() > 2 * tolerance
