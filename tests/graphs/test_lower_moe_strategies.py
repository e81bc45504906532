"""gather and capacity lowerings: structure and numbers against transformers' Llama4TextMoe.

Tolerance: fp32 on both sides, only summation order differs; 1e-5 x max|expected| is about
100x the observed error and far below what a wrong expert or score would cause (order 1).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from llama4_deploy.graphs.lower_moe_capacity import CapacityConfig, LowerMoeCapacityPass
from llama4_deploy.graphs.lower_moe_gather import LowerMoeGatherPass
from llama4_deploy.graphs.lower_moe_native import LowerMoeNativePass
from llama4_deploy.graphs.passes import LoweringError
from llama4_deploy.runtime.abi import MOE_OVERFLOW
from tests.graphs.moe_fixtures import assert_close_fp32, hf_moe, moe_model, run_ort, transformers_output

E, H, I = 8, 32, 16


def _model(weights, top_k=1) -> ir.Model:
    return moe_model(weights, H, top_k, token_valid=True)


def _run(model, x, valid):
    return run_ort(model, x=x, token_valid=valid)


@pytest.mark.parametrize("tokens", [1, 8, 13])
def test_gather(tokens):
    moe, weights = hf_moe(E, H, I)
    model = _model(weights)
    assert LowerMoeGatherPass()(model).count == 1
    op_types = [n.op_type for n in model.graph]
    assert op_types.count("Gather") == 2 and "ScatterElements" not in op_types
    assert all(n.name.startswith("/layers.1/moe/gather/") for n in model.graph)
    x = np.random.default_rng(tokens).normal(size=(tokens, H)).astype(np.float32)
    assert_close_fp32(_run(model, x, np.ones(tokens, bool))["y"], transformers_output(moe, x))


def test_capacity_exact_without_overflow():
    moe, weights = hf_moe(E, H, I)
    model = _model(weights)
    # capacity factor E: every expert can take every token, so no overflow is possible
    assert LowerMoeCapacityPass(CapacityConfig(capacity_factor=E))(model).count == 1
    assert [o.name for o in model.graph.outputs] == ["y", MOE_OVERFLOW]
    x = np.random.default_rng(0).normal(size=(40, H)).astype(np.float32)
    out = _run(model, x, np.ones(40, bool))
    assert out[MOE_OVERFLOW].tolist() == [False]
    assert_close_fp32(out["y"], transformers_output(moe, x))


def test_capacity_reports_overflow_exactly():
    moe, weights = hf_moe(E, H, I)
    x = np.random.default_rng(1).normal(size=(64, H)).astype(np.float32)
    model = _model(weights)
    LowerMoeCapacityPass(CapacityConfig(capacity_factor=1.0))(model)  # C = 8 slots per expert
    out = _run(model, x, np.ones(64, bool))
    load = np.bincount((x @ weights["router"]).argmax(-1), minlength=E)
    assert out[MOE_OVERFLOW].tolist() == [bool(load.max() > 8)]
    if not load.max() > 8:
        assert_close_fp32(out["y"], transformers_output(moe, x))


def test_capacity_adversarial_routing_overflows():
    """Every token picks expert 3: the graph must say so, whatever the capacity factor below E."""
    moe, weights = hf_moe(E, H, I, hot_expert=3)
    model = _model(weights)
    LowerMoeCapacityPass(CapacityConfig(capacity_factor=1.25))(model)
    x = np.abs(np.random.default_rng(2).normal(size=(16, H))).astype(np.float32)
    assert (x @ weights["router"]).argmax(-1).tolist() == [3] * 16
    assert _run(model, x, np.ones(16, bool))[MOE_OVERFLOW].tolist() == [True]


def test_capacity_padding_takes_no_slot():
    """Ragged batch: 3 valid tokens and 13 padding tokens all routed to expert 3. Capacity
    ceil(1.25 * 16 / 8) = 3 fits the valid ones exactly; padding must not cause overflow nor
    change valid outputs."""
    moe, weights = hf_moe(E, H, I, hot_expert=3)
    model = _model(weights)
    LowerMoeCapacityPass(CapacityConfig(capacity_factor=1.25))(model)
    x = np.abs(np.random.default_rng(3).normal(size=(16, H))).astype(np.float32)
    valid = np.zeros(16, bool)
    valid[[0, 5, 9]] = True
    out = _run(model, x, valid)
    assert out[MOE_OVERFLOW].tolist() == [False]
    assert_close_fp32(out["y"][valid], transformers_output(moe, x)[valid])
    # one more valid token on the same expert overflows
    valid[12] = True
    assert _run(model, x, valid)[MOE_OVERFLOW].tolist() == [True]


@pytest.mark.parametrize("top_k", [1, 2])
def test_capacity_gather_combine_matches_scatter_add(top_k):
    """TensorRT's combine (no ScatterND reduction) gives the scatter-add's outputs bit for bit at k = 1
    and within fp32 summation order at k = 2, padding included, and the same overflow flag."""
    _, weights = hf_moe(E, H, I)
    x = np.random.default_rng(4).normal(size=(24, H)).astype(np.float32)
    valid = np.ones(24, bool)
    valid[[3, 17]] = False
    outs = {}
    for combine in ("scatter_add", "gather"):
        model = _model(weights, top_k)
        LowerMoeCapacityPass(CapacityConfig(capacity_factor=E / top_k, combine=combine))(model)
        ops = [n.op_type for n in model.graph]
        assert ("ScatterND" in ops) == (combine == "scatter_add")
        outs[combine] = _run(model, x, valid)
    assert outs["gather"][MOE_OVERFLOW].tolist() == outs["scatter_add"][MOE_OVERFLOW].tolist() == [False]
    if top_k == 1:
        np.testing.assert_array_equal(outs["gather"]["y"][valid], outs["scatter_add"]["y"][valid])
    else:
        assert_close_fp32(outs["gather"]["y"][valid], outs["scatter_add"]["y"][valid])


def test_capacity_gather_combine_overflow_still_reported():
    _, weights = hf_moe(E, H, I, hot_expert=3)
    model = _model(weights)
    LowerMoeCapacityPass(CapacityConfig(capacity_factor=1.25, combine="gather"))(model)
    x = np.abs(np.random.default_rng(2).normal(size=(16, H))).astype(np.float32)
    assert _run(model, x, np.ones(16, bool))[MOE_OVERFLOW].tolist() == [True]


@pytest.mark.parametrize("split", [1, 2, 4])
@pytest.mark.parametrize("tokens", [1, 13])
def test_gather_native_layout(tokens, split):
    """The gather over the native lowering's weights (interleaved fc1, transposed fc2 scaled by P): the same
    numbers as transformers (same fp32 bound: only summation order differs), and the very initializers the
    native graph reads, so a bundle with both stores the experts once."""
    moe, weights = hf_moe(E, H, I)
    model = _model(weights)
    assert LowerMoeGatherPass("native", split)(model).count == 1
    op_types = [n.op_type for n in model.graph]
    assert op_types.count("Gather") == 2 and "Transpose" not in op_types
    tag = "native" if split == 1 else f"native{split}"
    assert set(model.graph.initializers) >= {f"gate_up.{tag}_fc1", f"down.{tag}_fc2"}
    assert not {"gate_up", "down"} & set(model.graph.initializers)  # the matmul layout is not kept
    native = _model(weights)
    LowerMoeNativePass(split)(native)
    for name in (f"gate_up.{tag}_fc1", f"down.{tag}_fc2"):
        np.testing.assert_array_equal(
            model.graph.initializers[name].const_value.numpy(), native.graph.initializers[name].const_value.numpy()
        )
    x = np.random.default_rng(tokens).normal(size=(tokens, H)).astype(np.float32)
    expected = transformers_output(moe, x)
    assert_close_fp32(_run(model, x, np.ones(tokens, bool))["y"], expected)
    assert len(set((x @ weights["router"]).argmax(axis=1).tolist())) >= min(tokens, 4)  # several experts in play


def test_gather_native_layout_top_k_two():
    """top_k 2 (which the native op cannot take): the same numbers as the matmul-layout gather."""
    _, weights = hf_moe(E, H, I)
    model, reference = _model(weights, top_k=2), _model(weights, top_k=2)
    assert LowerMoeGatherPass("native", split=2)(model).count == 1
    assert LowerMoeGatherPass()(reference).count == 1
    x = np.random.default_rng(3).normal(size=(5, H)).astype(np.float32)
    valid = np.ones(5, bool)
    assert_close_fp32(_run(model, x, valid)["y"], _run(reference, x, valid)["y"])


def test_capacity_refuses_a_node_without_token_valid():
    """Padding could take capacity: the pass names the node and changes nothing."""
    _, weights = hf_moe(E, H, I)
    model = moe_model(weights, H)  # no token_valid input
    with pytest.raises(LoweringError) as refusal:
        LowerMoeCapacityPass()(model)
    assert str(refusal.value) == (
        "MoE node /layers.1/node_moe was not lowered to capacity: it has no token_valid "
        "input, so padding could take capacity"
    )
    assert len(list(model.graph)) == 1 and MOE_OVERFLOW not in [o.name for o in model.graph.outputs]


def test_gather_native_layout_refuses_what_the_native_layout_cannot_hold():
    _, weights = hf_moe(E, H, I)
    model = _model(weights)
    with pytest.raises(
        LoweringError,
        match="^MoE node /layers.1/node_moe was not lowered to gather: it has an "
        "intermediate size of 16, not divisible by split 32$",
    ):
        LowerMoeGatherPass("native", split=32)(model)
    assert set(model.graph.initializers) >= {"gate_up", "down"}
    with pytest.raises(ValueError, match="unknown gather layout 'rows'"):
        LowerMoeGatherPass("rows")
