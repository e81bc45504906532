"""A PyTorch fake-quant simulation of a quantization spec on transformers' Llama4ForCausalLM.

Each weight the spec names is replaced in place by its quantized-then-dequantized value
(graphs/quantize.py, the very functions the graph passes use), along the same reduction axis the
engine contracts; with fp8 activations, every activation entering a quantized linear layer is
fake-quantized with its calibrated per-tensor scale (forward pre-hooks on nn.Linear, and a
replacement forward for the stacked experts that quantizes both of their matmul inputs); with int8
activations (--int4-compute int8), each such input is rounded to int8 per row and block, as ONNX
Runtime's MatMulNBits and QMoE round it. The model then computes what the engine computes, in
fp32: the engine must match it tightly, which catches wiring errors (a wrong axis, a transposed
scale) that quality metrics against fp32 hide.
"""

from __future__ import annotations

import types
from collections.abc import Mapping

import numpy as np
import torch

from llama4_deploy.export.awq import transforms
from llama4_deploy.export.observe import experts_forward, module_at, quantized_weights
from llama4_deploy.export.shape import ModelShape
from llama4_deploy.export.weights import all_weights
from llama4_deploy.graphs.quantize import (
    FP8_MAX,
    QuantSpec,
    fake_quant,
    fake_quant_activation,
    fake_quant_int8_blocks,
    fp8_activation_scale,
)


def jittered(x, jitter: float):
    """x * (1 + jitter * s), s alternating +1 / -1 along the last axis: a deterministic relative perturbation the
    size of float summation noise, which moves an activation across a rounding tie exactly when a different
    summation order could (`simulate`'s jitter)."""
    if not jitter:
        return x
    signs = 1 - 2 * (torch.arange(x.shape[-1], device=x.device) % 2).to(x.dtype)
    return x * (1 + jitter * signs)


def simulate(
    model,
    spec: QuantSpec,
    activation_amax: Mapping[str, float] | None = None,
    per_token: bool = False,
    awq_scales: Mapping[str, np.ndarray] | None = None,
    layers=None,
    jitter: float = 0.0,
):
    """Turn `model` (fp32 Llama4ForCausalLM) into the fake-quant simulation of `spec`, in place. Weights of
    rules with method `checkpoint` are left as they are (the model holds the checkpoint's dequantized FP8).
    `per_token`: fp8 activations scaled dynamically, one scale per token (|max| of its row / 448), as a
    compressed-tensors checkpoint declares them, instead of the engine's static per-tensor scales.
    `awq_scales`: the bundle's AWQ scales, folded into the weights first (export/awq.py's rewrites).
    `layers`: decoder layers to simulate (all when None); export/layerwise.py simulates one layer at a time on a
    meta-device model that holds only that layer (the spec quantizes decoder layers only, so nothing else moves).
    `jitter`: every activation that is rounded (fp8, int8) is first perturbed by that relative amount
    (`jittered`); the simulation's distance from itself so perturbed is the noise floor that rounding ties put
    under any two float orders of the same computation (llama4_deploy/quality/verify.py)."""
    shape = ModelShape.from_config(model.config.to_dict())
    chosen = (lambda name: True) if layers is None else (lambda name: _layer_of(name) in layers)
    if awq_scales is not None:
        _rewrite_awq(model, shape, awq_scales, chosen)
    weights = [
        (name, checkpoint_name, axis) for name, checkpoint_name, axis in quantized_weights(shape) if chosen(name)
    ]
    with torch.no_grad():
        for name, checkpoint_name, axis in weights:
            rule = spec.rule_for(name)
            if rule is None or rule.method == "checkpoint":
                continue
            param = module_at(model, checkpoint_name)
            param.copy_(torch.from_numpy(fake_quant(param.numpy(), rule, axis % param.ndim, spec.compute_dtype)))

    def int8(x, block: int):
        return torch.from_numpy(fake_quant_int8_blocks(jittered(x, jitter).detach().numpy(), block)).to(x.dtype)

    for handle_name, checkpoint_name, _ in weights:
        rule = spec.rule_for(handle_name)
        if handle_name.endswith(("experts_gate_up", "experts_down")):
            continue  # the stacked experts' two matmuls: below
        if rule is not None and rule.activation == "int8_block":  # MatMulNBits' int8 input, per row and block
            module = module_at(model, checkpoint_name.rsplit(".", 1)[0])
            module.register_forward_pre_hook(lambda m, args, b=rule.block_size: (int8(args[0], b),) + args[1:])
    if spec.int8_experts is not None:
        # QMoE with accuracy_level 4 (graphs/lower_quant_ort.py): fc1's input (each token's routed row, x times its
        # score; the rows of experts a token did not pick are 0 here and stay 0) and fc2's input (the SwiGLU output)
        # rounded per row and block of K, as MatMulNBits rounds its input
        def int8_experts(name, x):
            rule = spec.rule_for(name)
            return x if rule is None or rule.activation != "int8_block" else int8(x, rule.block_size)

        _hook_experts(model, shape, layers, int8_experts)
    if spec.activations:
        scales = {
            name: fp8_activation_scale(amax, spec.compute_dtype) for name, amax in (activation_amax or {}).items()
        }

        def quantize(name, x):
            rule = spec.rule_for(name)
            if rule is None or rule.activation == "none":
                return x
            x = jittered(x, jitter)
            if per_token:
                return _per_token_fp8(x)
            return torch.from_numpy(fake_quant_activation(x.detach().numpy(), scales[name])).to(x.dtype)

        for handle_name, checkpoint_name, _ in weights:
            if handle_name.endswith(("experts_gate_up", "experts_down")):
                continue
            module = module_at(model, checkpoint_name.rsplit(".", 1)[0])
            module.register_forward_pre_hook(lambda m, args, n=handle_name: (quantize(n, args[0]),) + args[1:])
        _hook_experts(model, shape, layers, quantize)
    return model


def _hook_experts(model, shape: ModelShape, layers, transform) -> None:
    """`transform(name, x)` on both matmul inputs of every chosen MoE layer's stacked experts (observe.experts_forward;
    `name`: the deploy-form weight the input feeds, `layers.3.experts_gate_up` / `layers.3.experts_down`)."""
    for layer, kind in enumerate(shape.layer_kinds):
        if kind.moe and (layers is None or layer in layers):
            experts = model.model.layers[layer].feed_forward.experts
            experts._record = (f"layers.{layer}", transform)
            experts.forward = types.MethodType(experts_forward, experts)


def _layer_of(name: str) -> int | None:
    """The decoder layer of a deploy-form weight name (`layers.3.q` -> 3), None outside the layers."""
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "layers" else None


def _rewrite_awq(model, shape: ModelShape, awq_scales, chosen=lambda name: True) -> None:
    rewrites = transforms(shape, awq_scales)
    with torch.no_grad():
        for name, source in all_weights(shape).items():
            if name not in rewrites or not chosen(name):
                continue
            param = module_at(model, source.checkpoint_name)
            w = param.numpy()
            w = np.swapaxes(w, -1, -2) if source.transpose else w
            w = rewrites[name](w)
            param.copy_(torch.from_numpy(np.ascontiguousarray(np.swapaxes(w, -1, -2) if source.transpose else w)))


def _per_token_fp8(x):
    """x fake-quantized to FP8 with one scale per token (row): compressed-tensors' dynamic `token` strategy."""
    amax = x.detach().abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype) * scale


def quality(engine_logits: np.ndarray, reference_logits: np.ndarray) -> dict[str, float]:
    """Per-position agreement of two logit sets [T, V]: min cosine, max/mean KL(reference || engine), greedy."""
    a = np.asarray(engine_logits, dtype=np.float64)
    b = np.asarray(reference_logits, dtype=np.float64)
    cosine = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(b), log_softmax(a)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return {
        "min_cosine": float(cosine.min()),
        "max_kl": float(kl.max()),
        "mean_kl": float(kl.mean()),
        "greedy_agree": int((a.argmax(-1) == b.argmax(-1)).sum()),
        "positions": int(len(a)),
    }
