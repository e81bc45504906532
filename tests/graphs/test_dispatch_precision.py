"""Every MoE dispatch x precision, on one MoE layer (transformers' Llama4TextMoe, E=8, H=64, I=32): each lowering
(dense, gather, capacity, native) in fp16, fp8 (qdq) and int4 (qdq and ort forms, the ort form also with int8
activations) against a PyTorch fake-quant
simulation of the same spec, or the one-sentence refusal the build gives (fp8 x native: no place for the activation
Q/DQ inside ONNX Runtime's fused MoE kernel; fp16 x capacity: ONNX Runtime's CPU has no float16 ScatterND-add, and
the graph indeed fails there, which the test also checks).

Tolerance: verify.SIMULATION_TOLERANCE x max(1, max |y|), by compute dtype (float32: the same dequantized weights,
summation order and an occasional neighbouring fp8 activation value; float16: 11-bit activations), the bound the
whole-model verify uses. The int4 ort form under native dispatch is ONNX Runtime's QMoE (block 32 divides H and I);
under the others its experts fall through to blocked DequantizeLinear and the shared expert is MatMulNBits.
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


def _spec(choice: str):
    precision, form, compute = (choice.split("-") + ["", ""])[:3]
    spec = make_spec(
        QuantConfig(precision=precision, block_size=32, form=form or "auto", int4_compute=compute or "float")
    )
    if len(spec.rules) == 2:  # int8 compute: experts keep float activations, the shared expert's MatMulNBits int8
        patterns = (PATTERNS[:2], PATTERNS[2:])
    else:
        patterns = (PATTERNS,) * len(spec.rules)
    return spec.model_copy(
        update={"rules": tuple(r.model_copy(update={"patterns": p}) for r, p in zip(spec.rules, patterns))}
    )


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
    int8 = next((r for r in spec.rules if r.activation == "int8_block"), None)
    if int8 is not None:  # MatMulNBits (accuracy_level 4) on the shared expert: int8 inputs per row and block
        for module in SHARED.values():
            getattr(moe.shared_expert, module).register_forward_pre_hook(
                lambda m, args: (torch.from_numpy(fake_quant_int8_blocks(args[0].numpy(), int8.block_size)),)
            )
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
    refusals = targets.get("onnxruntime").dispatch_refusals(spec)
    if choice == "fp16" and dispatch == "capacity":
        assert refusals["capacity"].startswith("ONNX Runtime's CPU has no float16 ScatterND with reduction add")
        with pytest.raises(Exception, match="MLFloat16 data type is not supported with ScatterND"):
            run_ort(model, x=x.astype(np.float16), token_valid=np.ones(TOKENS, bool))
        return
    assert dispatch not in refusals or (choice, dispatch) == ("fp8", "native")
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
