"""Which activations the decoder's linear layers see, observed on transformers' Llama4ForCausalLM by hooks: the
inputs of every linear layer the quantization presets cover, the stacked experts' two matmuls included. Calibration
(export/calibrate.py) records their ranges through it, AWQ (export/awq.py) their statistics, and the fake-quant
simulation (export/simulate.py) rounds them through the same hooks."""

from __future__ import annotations

import types
from collections.abc import Callable

import torch

from llama4_deploy.export.shape import ModelShape
from llama4_deploy.export.weights import layer_weights


def module_at(model, dotted: str):
    module = model
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def quantized_weights(shape: ModelShape):
    """(deploy-form name, checkpoint parameter name, reduction axis in the checkpoint layout) per weight."""
    for layer, kind in enumerate(shape.layer_kinds):
        for name, source in layer_weights(shape, layer, kind).items():
            yield f"layers.{layer}.{name}", source.checkpoint_name, -1 if source.transpose else -2


def linear_inputs(model, shape: ModelShape, record: Callable[[str, object], None], layers=None) -> list:
    """Call `record(weight name, activation tensor)` for every activation entering a linear layer of the
    decoder (of `layers` only, when given); returns the hook handles (remove them when done). Experts' two
    matmuls are both reported."""
    handles = []
    for name, checkpoint_name, _ in quantized_weights(shape):
        if layers is not None and int(name.split(".")[1]) not in layers:
            continue
        param = checkpoint_name.rsplit(".", 1)
        module = module_at(model, param[0])
        if name.endswith(("experts_gate_up", "experts_down")):
            continue
        handles.append(module.register_forward_pre_hook(lambda m, args, n=name: record(n, args[0])))
    for layer, kind in enumerate(shape.layer_kinds):
        if kind.moe and (layers is None or layer in layers):
            experts = model.model.layers[layer].feed_forward.experts
            experts._record = (f"layers.{layer}", record)
            experts.forward = types.MethodType(experts_forward, experts)
    return handles


def experts_forward(self, hidden_states):
    """Llama4TextExperts.forward, reporting (and, when asked, transforming) both matmul inputs."""
    prefix, record = self._record
    hidden_states = hidden_states.view(self.gate_up_proj.shape[0], -1, self.hidden_size)
    hidden_states = record(f"{prefix}.experts_gate_up", hidden_states)
    gate, up = torch.bmm(hidden_states, self.gate_up_proj).chunk(2, dim=-1)
    glu = record(f"{prefix}.experts_down", up * self.act_fn(gate))
    return torch.bmm(glu, self.down_proj).view(-1, self.hidden_size)
