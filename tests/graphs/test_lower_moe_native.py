"""LowerMoeNativePass: structure (one com.microsoft.MoE), lazy weights, refusals, and numbers
(ONNX Runtime's CPU MoE kernel vs transformers' Llama4TextMoe on the same weights)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from llama4_deploy.graphs import ops
from llama4_deploy.graphs.lower_moe_native import (
    MS_DOMAIN,
    LowerMoeNativePass,
    fc1_layout,
    fc1_relayout,
    fc2_layout,
    fc2_relayout,
    parts,
    relaid,
)
from llama4_deploy.graphs.passes import LoweringError
from llama4_deploy.graphs.streamed import Stored, StreamedTensor
from tests.graphs.moe_fixtures import assert_close_fp32, hf_moe, moe_model, run_ort, transformers_output

E, H, I = 16, 64, 32  # 2I == H: fc1 is square, so only the numbers would catch a transposed fc1
TOKENS = 13


def _moe_model(weights, hidden: int = H, **kwargs) -> ir.Model:
    return moe_model(weights, hidden, **kwargs)


def _hf_moe(num_experts=E, hidden=H, intermediate=I, seed=0):
    return hf_moe(num_experts, hidden, intermediate, seed)


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    return run_ort(model, x=x)["y"]


def _x(seed=0, tokens=TOKENS):
    return np.random.default_rng(seed).normal(size=(tokens, H)).astype(np.float32)


def test_structure_and_count():
    _, weights = _hf_moe()
    model = _moe_model(weights)
    assert LowerMoeNativePass()(model).count == 1
    nodes = list(model.graph)
    moe_nodes = [n for n in nodes if (n.domain, n.op_type) == (MS_DOMAIN, "MoE")]
    assert len(moe_nodes) == 1
    assert not any(n.domain == ops.DOMAIN for n in nodes)
    assert ops.DOMAIN not in model.opset_imports and model.opset_imports[MS_DOMAIN] == 1
    assert all(n.name.startswith("/layers.1/moe/native/") for n in nodes)
    assert model.graph.outputs[0].name == "y"
    moe = moe_nodes[0]
    attrs = {name: attr.value for name, attr in moe.attributes.items()}
    assert (attrs.pop("k"), attrs.pop("activation_type"), attrs.pop("swiglu_fusion")) == (1, "swiglu", 1)
    assert attrs == {
        "activation_alpha": 1.0,
        "activation_beta": 0.0,
        "normalize_routing_weights": 1,
        "use_sparse_mixer": 0,
    }
    fc1, bias, fc2 = moe.inputs[2], moe.inputs[3], moe.inputs[4]
    assert bias is None and len(moe.inputs) == 5
    assert (fc1.name, fc1.shape.numpy()) == ("gate_up.native_fc1", (E, 2 * I, H))
    assert (fc2.name, fc2.shape.numpy()) == ("down.native_fc2", (E, H, I))
    # the originals are replaced, not duplicated; the shared expert and router stay as they were
    assert set(model.graph.initializers) == {
        "router",
        "shared_gate",
        "shared_up",
        "shared_down",
        "gate_up.native_fc1",
        "down.native_fc2",
    }


def test_weight_layouts():
    """fc1 row 2i is gate column i, row 2i+1 is up column i; fc2 is down transposed per expert."""
    _, weights = _hf_moe()
    gate_up, down = weights["gate_up"], weights["down"]
    fc1, fc2 = fc1_layout(gate_up), fc2_layout(down)
    np.testing.assert_array_equal(fc1[:, 0::2, :], gate_up[..., :I].transpose(0, 2, 1))
    np.testing.assert_array_equal(fc1[:, 1::2, :], gate_up[..., I:].transpose(0, 2, 1))
    np.testing.assert_array_equal(fc2, down.transpose(0, 2, 1))


@pytest.mark.parametrize("p", [2, 4])
def test_split_weight_layouts(p):
    """Virtual expert q*E + e is part q of expert e: its gate/up rows interleaved, its down rows
    transposed and scaled by P (exactly: P is a power of two)."""
    _, weights = _hf_moe()
    gate_up, down = weights["gate_up"], weights["down"]
    fc1, fc2 = fc1_layout(gate_up, p), fc2_layout(down, p)
    ip = I // p
    assert fc1.shape == (p * E, 2 * ip, H) and fc2.shape == (p * E, H, ip)
    for q in range(p):
        part = slice(q * ip, (q + 1) * ip)
        np.testing.assert_array_equal(fc1[q * E : (q + 1) * E, 0::2], gate_up[..., :I][..., part].transpose(0, 2, 1))
        np.testing.assert_array_equal(fc1[q * E : (q + 1) * E, 1::2], gate_up[..., I:][..., part].transpose(0, 2, 1))
        np.testing.assert_array_equal(fc2[q * E : (q + 1) * E], p * down[:, part].transpose(0, 2, 1))


@pytest.mark.parametrize("p", [1, 2])
def test_weight_layouts_in_every_dtype(p):
    """The layouts take what the build hands them: bf16 numpy (ml_dtypes, bf16 compute: moved as uint16) and a
    checkpoint's bf16 torch tensor converted to fp32 in the same copy (a StreamedTensor's `stored`); both equal
    the fp32 layout of the same (bf16-representable) values."""
    import ml_dtypes
    import torch

    _, weights = _hf_moe()
    gate_up = weights["gate_up"].astype(ml_dtypes.bfloat16)
    down = weights["down"].astype(ml_dtypes.bfloat16)
    want_fc1, want_fc2 = fc1_layout(gate_up.astype(np.float32), p), fc2_layout(down.astype(np.float32), p)
    fc1, fc2 = fc1_layout(gate_up, p), fc2_layout(down, p)
    assert fc1.dtype == fc2.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(fc1.astype(np.float32), want_fc1)
    np.testing.assert_array_equal(fc2.astype(np.float32), want_fc2)  # x P exact in bf16 too
    as_torch = lambda a: torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)  # noqa: E731
    fc1 = fc1_layout(as_torch(gate_up), p, torch.float32)
    fc2 = fc2_layout(as_torch(down), p, torch.float32)
    assert fc1.dtype == fc2.dtype == torch.float32
    np.testing.assert_array_equal(fc1.numpy(), want_fc1)
    np.testing.assert_array_equal(fc2.numpy(), want_fc2)


@pytest.mark.parametrize("p, chunk_bytes", [(1, 1), (2, 3 * 2 * I * H * 4 // 2), (2, 1 << 30)])
def test_streamed_write_is_the_whole_layout(tmp_path, p, chunk_bytes, monkeypatch):
    """A checkpoint weight (a StreamedTensor whose `stored` is its bf16 torch tensor and the check) written to a file
    goes through
    Relayout.chunks a few experts at a time: the bytes are the whole layout's, for one expert per piece, pieces
    that end inside a part (1.5 experts' rows: a ragged last piece per part), and one piece per part; the check
    sees every piece."""
    import ml_dtypes
    import torch

    from llama4_deploy.graphs import lower_moe_native

    monkeypatch.setattr(lower_moe_native, "CHUNK_BYTES", chunk_bytes)
    _, weights = _hf_moe()
    for key, relayout in (("gate_up", fc1_relayout(p)), ("down", fc2_relayout(p))):
        values = weights[key].astype(ml_dtypes.bfloat16).astype(np.float32)
        raw = torch.from_numpy(values).to(torch.bfloat16)
        checked = []

        def finish(tensor, name, checked=checked):
            checked.append(tensor.shape[0])
            return ir.tensor(tensor.contiguous().numpy(), name=name)

        source = StreamedTensor(
            lambda values=values, key=key: ir.tensor(values, name=key),
            ir.DataType.FLOAT,
            values.shape,
            key,
            stored=Stored(lambda raw=raw: raw, finish),
        )
        want = relayout(values)
        tensor = relaid(source, f"{key}.relaid", want.shape, relayout)
        assert isinstance(tensor, StreamedTensor) and tensor.writes_in_pieces
        with open(tmp_path / key, "wb") as f:
            tensor.tofile(f)
        got = np.fromfile(tmp_path / key, dtype=np.float32).reshape(want.shape)
        np.testing.assert_array_equal(got, want)
        assert sum(checked) == p * E and (len(checked) > p) == (chunk_bytes < 1 << 30)
        np.testing.assert_array_equal(tensor.numpy(), want)  # the whole-stack path (quantization reads it)


def test_parts_rule():
    """Split only experts big enough that a part still streams >= 2 MiB, at most 4 ways."""
    mib = 1 << 20
    assert parts(256, 786_432) == 1  # maverick-mini's 0.75 MiB experts stay whole
    assert parts(1024, 6 * mib) == 2  # scout-mini's 6 MiB experts: two 3 MiB parts
    assert parts(8192, 480 * mib) == 4  # Scout / Maverick (fp32): capped at 4
    assert parts(8191, 480 * mib) == 1  # an odd intermediate size cannot be halved


def test_matches_transformers_moe():
    """fp32 both sides; the kernel's routing weight is exactly 1 and only summation order differs
    (MLAS vs torch GEMMs): observed 3.5e-7 x max|y| here, at most 4.4e-7 over 5 weight seeds x
    {1, 13, 64} tokens, so 1e-5 x max|y| is a >20x margin, while a wrong layout (not interleaved,
    not transposed), unnormalized routing weight or unscaled input is off by O(max|y|)."""
    moe, weights = _hf_moe()
    x = _x()
    model = _moe_model(weights)
    LowerMoeNativePass()(model)
    expected = transformers_output(moe, x)
    assert_close_fp32(_run(model, x), expected)
    # the test exercises routing: tokens go to several experts, and the routed part matters
    assert len(set((x @ weights["router"]).argmax(axis=1).tolist())) >= 4
    gate = x @ weights["shared_gate"]
    shared_only = (gate / (1 + np.exp(-gate)) * (x @ weights["shared_up"])) @ weights["shared_down"]
    assert np.abs(shared_only - expected).max() > 0.1


@pytest.mark.parametrize("split", [2, 4])
def test_split_experts_match_transformers_moe(split):
    """Split into parts, the kernel gives each of a token's P virtual experts weight 1/P exactly
    and fc2 carries the factor P, so only summation order changes: same bound as unsplit."""
    moe, weights = _hf_moe()
    x = _x()
    model = _moe_model(weights)
    assert LowerMoeNativePass(split)(model).count == 1
    [node] = [n for n in model.graph if n.op_type == "MoE"]
    assert node.attributes["k"].as_int() == split
    assert node.inputs[2].name == f"gate_up.native{split}_fc1" and node.inputs[2].shape.numpy() == (
        split * E,
        2 * I // split,
        H,
    )
    assert_close_fp32(_run(model, x), transformers_output(moe, x))


def test_split_must_divide():
    _, weights = _hf_moe()
    with pytest.raises(ValueError, match="power of two"):
        LowerMoeNativePass(split=3)
    with pytest.raises(
        LoweringError,
        match="^MoE node /layers.1/node_moe was not lowered to native: it has an "
        "intermediate size of 32, not divisible by split 64$",
    ):
        LowerMoeNativePass(split=64)(_moe_model(weights))


def test_weights_stay_lazy():
    """The pass reads no weight data; the re-laid-out copies are computed at serialization."""
    _, weights = _hf_moe()
    reads = []

    def lazy(name):
        def load():
            reads.append(name)
            return ir.tensor(weights[name], name=name)

        return ir.LazyTensor(load, dtype=ir.DataType.FLOAT, shape=ir.Shape(weights[name].shape), name=name)

    model = _moe_model(weights, tensors={"gate_up": lazy("gate_up"), "down": lazy("down")})
    assert LowerMoeNativePass()(model).count == 1
    assert reads == []
    for name in ("gate_up.native_fc1", "down.native_fc2"):
        assert isinstance(model.graph.initializers[name].const_value, ir.LazyTensor)
    reference = _moe_model(weights)
    LowerMoeNativePass()(reference)
    x = _x(seed=2)
    np.testing.assert_array_equal(_run(model, x), _run(reference, x))
    assert sorted(set(reads)) == ["down", "gate_up"]


def test_refuses_top_k_above_one():
    _, weights = _hf_moe()
    model = _moe_model(weights, top_k=2)
    with pytest.raises(LoweringError) as refusal:
        LowerMoeNativePass()(model)
    assert str(refusal.value) == (
        "MoE node /layers.1/node_moe was not lowered to native: it has top_k 2; "
        "com.microsoft.MoE can express only top_k 1 (Llama 4 scales each expert's input "
        "by its own score, the op weights outputs)"
    )
    # nothing changed: the node, its domain, its weights
    assert [(n.domain, n.op_type) for n in model.graph] == [(ops.DOMAIN, ops.MOE)]
    assert ops.DOMAIN in model.opset_imports and MS_DOMAIN not in model.opset_imports
    assert "gate_up" in model.graph.initializers and "gate_up.native_fc1" not in model.graph.initializers


@pytest.mark.parametrize("name", ["gate_up", "down"])
def test_refuses_weights_without_value(name):
    _, weights = _hf_moe()
    model = _moe_model(weights, as_inputs=(name,))
    with pytest.raises(LoweringError) as refusal:
        LowerMoeNativePass()(model)
    assert str(refusal.value) == (
        f"MoE node /layers.1/node_moe was not lowered to native: it has a {name} input "
        f"({name}) that is not an initializer with a value, so it cannot be re-laid out"
    )


def test_two_layers_sharing_weights():
    """Weights shared by two MoE nodes are re-laid out once; the second node's input (an untyped
    intermediate) still lowers and serializes. Compared with the dense lowering (same tolerance)."""
    from llama4_deploy.graphs.lower_moe_dense import LowerMoeDensePass

    _, weights = _hf_moe()

    def two_layers():
        model = _moe_model(weights)
        first = next(iter(model.graph))
        second = ir.Node(
            ops.DOMAIN,
            ops.MOE,
            [first.outputs[0], *first.inputs[1:]],
            attributes=[ir.AttrInt64("top_k", 1)],
            name="/layers.3/node_moe",
            num_outputs=1,
        )
        model.graph.append(second)
        first.outputs[0].name, second.outputs[0].name = "y1", "y"
        model.graph.outputs[0] = second.outputs[0]
        return model

    native, dense = two_layers(), two_layers()
    assert LowerMoeNativePass()(native).count == 2
    LowerMoeDensePass()(dense)
    assert sorted(n.name for n in native.graph if n.op_type == "MoE") == [
        "/layers.1/moe/native/experts/MoE",
        "/layers.3/moe/native/experts/MoE",
    ]
    assert [name for name in native.graph.initializers if "native" in name] == ["gate_up.native_fc1", "down.native_fc2"]
    x = _x(seed=3)
    expected = _run(dense, x)
    np.testing.assert_allclose(_run(native, x), expected, atol=1e-5 * np.abs(expected).max(), rtol=0)
