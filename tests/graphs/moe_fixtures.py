"""Shared fixtures for the MoE lowering tests: transformers' Llama4TextMoe with its weights in the
deploy-form layout, a one-node `llama4_deploy.MoE` model over them, and an ONNX Runtime run."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch

from llama4_deploy.graphs import ops


def hf_moe(
    num_experts: int = 8, hidden: int = 32, intermediate: int = 16, seed: int = 0, hot_expert: int | None = None
):
    """(Llama4TextMoe with N(0, 0.3) weights, {deploy name: array}). `hot_expert` adds +100 to that
    expert's router column, so (for inputs with positive entries) every token picks it."""
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    torch.manual_seed(seed)
    cfg = Llama4TextConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_local_experts=num_experts, num_experts_per_tok=1
    )
    moe = Llama4TextMoe(cfg).eval()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
        if hot_expert is not None:
            moe.router.weight[hot_expert] += 100.0
    weights = {
        "router": moe.router.weight.T.detach().numpy().copy(),
        "gate_up": moe.experts.gate_up_proj.detach().numpy().copy(),
        "down": moe.experts.down_proj.detach().numpy().copy(),
        "shared_gate": moe.shared_expert.gate_proj.weight.T.detach().numpy().copy(),
        "shared_up": moe.shared_expert.up_proj.weight.T.detach().numpy().copy(),
        "shared_down": moe.shared_expert.down_proj.weight.T.detach().numpy().copy(),
    }
    return moe, weights


def moe_model(
    weights: dict[str, np.ndarray],
    hidden: int,
    top_k: int = 1,
    token_valid: bool = False,
    tensors: dict[str, ir.TensorProtocol] | None = None,
    as_inputs: tuple[str, ...] = (),
) -> ir.Model:
    """One llama4_deploy.MoE node named /layers.1/node_moe. Weights are initializers (with
    `tensors` overriding their data), except those named in `as_inputs`; with `token_valid` the
    node gets the optional token mask as a graph input."""
    ops.register_schemas()
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["tokens", hidden]))
    inputs, values, inits = [x], [], []
    for name in ops.MOE_INPUTS[1:-1]:
        value = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(weights[name].shape))
        if name in as_inputs:
            inputs.append(value)
        else:
            value.const_value = (tensors or {}).get(name) or ir.tensor(weights[name], name=name)
            inits.append(value)
        values.append(value)
    if token_valid:
        valid = ir.Value(name="token_valid", type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape(["tokens"]))
        inputs.append(valid)
        values.append(valid)
    node = ir.Node(
        ops.DOMAIN,
        ops.MOE,
        [x, *values],
        attributes=[ir.AttrInt64("top_k", top_k)],
        name="/layers.1/node_moe",
        num_outputs=1,
    )
    node.outputs[0].name = "y"
    graph = ir.Graph(inputs, node.outputs, nodes=[node], initializers=inits, opset_imports={"": 21, ops.DOMAIN: 1})
    return ir.Model(graph, ir_version=10)


def run_ort(model: ir.Model, **feeds: np.ndarray) -> dict[str, np.ndarray]:
    """Outputs by name, ONNX Runtime CPU with graph optimizations off (the graph as written)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def transformers_output(moe, x: np.ndarray) -> np.ndarray:
    """Llama4TextMoe's output for tokens x [N, H]."""
    with torch.no_grad():
        return moe(torch.from_numpy(x))[0].numpy()


def assert_close_fp32(got: np.ndarray, expected: np.ndarray) -> None:
    """fp32 on both sides, only summation order differs: 1e-5 x max|expected| is about 100x the
    observed error and far below what a wrong expert or score would cause (order 1)."""
    np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(expected).max(), rtol=0)
