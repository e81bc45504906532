"""link: one stamp per layer plus embed and head, weights lazy until saved, output deterministic."""

from __future__ import annotations

import hashlib

import onnx_ir as ir
import pytest

from llama4_deploy.build.steps.lower import link_model
from llama4_deploy.export.checkpoint import Checkpoint
from llama4_deploy.export.trace import trace_templates
from llama4_deploy.graphs.link import LinkError, Stamp, link
from llama4_deploy.runtime import abi
from tests.conftest import write_checkpoint


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return Checkpoint(write_checkpoint(tmp_path_factory.mktemp("ck") / "tiny"))


@pytest.fixture(scope="module")
def templates(tiny_checkpoint):
    return trace_templates(tiny_checkpoint.shape)


def test_templates_one_per_kind(templates, tiny_checkpoint):
    # tiny: layers 0, 2 RoPE dense; 1 RoPE MoE; 3 NoPE MoE
    assert sorted(templates) == [
        "embed",
        "head",
        "nope_global_moe",
        "prologue",
        "rope_chunked_dense",
        "rope_chunked_moe",
    ]
    for name in ("rope_chunked_dense", "nope_global_moe", "rope_chunked_moe"):
        nodes = [n for n in templates[name].graph if n.domain == "llama4_deploy"]
        assert sorted(n.op_type for n in nodes) == (["Attention", "MoE"] if name.endswith("moe") else ["Attention"])
    # weights are data-less placeholders, constants carry data
    layer = templates["rope_chunked_moe"].graph
    assert layer.initializers["q"].const_value is None
    assert layer.initializers["rope_rotation"].const_value is not None
    assert templates["prologue"].graph.initializers["rope_inv_freq"].const_value is not None
    # masks, RoPE angles and temperature are computed once, in the prologue, not per layer
    assert [v.name for v in templates["prologue"].graph.outputs] == [
        "token_valid",
        "chunked_cache_mask",
        "chunked_new_mask",
        "rope_cos",
        "rope_sin",
        "global_cache_mask",
        "global_new_mask",
        "temperature",
    ]
    assert not any(n.op_type in ("Cos", "Sin", "Mod") for n in layer)


def test_link_stamps_every_layer(templates, tiny_checkpoint):
    model, count = link_model(tiny_checkpoint, templates)
    assert count == 4 + 3  # layers, embed, prologue, head
    inits = model.graph.initializers
    assert "layers.3.router" in inits and "layers.0.mlp_gate" in inits and "head.lm_head" in inits
    assert "layers.0.router" not in inits
    assert all(isinstance(inits[name].const_value, ir.LazyTensor) for name in ("layers.3.router", "embed.embed"))
    names = [node.name for node in model.graph]
    assert len(names) == len(set(names))
    assert any(name.startswith("/layers.3/") for name in names)
    assert [o.name for o in model.graph.outputs][:3] == [abi.LOGITS, abi.present_key(0), abi.present_value(0)]
    # chunked layers have a dynamic ring (min(C, bucket) slots), global layers a dynamic context
    inputs = {v.name: v for v in model.graph.inputs}
    assert list(inputs[abi.past_key(0)].shape) == [ir.SymbolicDim("batch"), 2, ir.SymbolicDim("ring"), 16]
    assert str(inputs[abi.past_key(3)].shape[2]) == "context"


def test_link_rejects_wrong_weight_shape(templates):
    bad = ir.tensor(__import__("numpy").zeros((3, 3), dtype="float32"))
    x = ir.Value(name=abi.INPUT_IDS, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch", "new"]))
    with pytest.raises(LinkError, match=r"embed.embed: weight is FLOAT \(3, 3\), template wants FLOAT \(512, 64\)"):
        link(templates, [x], [Stamp("embed", "embed", {"input_ids": abi.INPUT_IDS}, {"embed": bad})], {})


def test_build_is_byte_identical(tmp_path):
    from llama4_deploy.build import build
    from llama4_deploy.export import trace

    digests = []
    for name in ("a", "b"):
        trace._TEMPLATES.clear()  # trace afresh: tracing must be deterministic too
        bundle = build("tiny", out=tmp_path / name, log=lambda _: None).bundle
        files = sorted(p.name for p in bundle.iterdir() if p.suffix in (".onnx", ".data"))
        assert "weights.data" in files and len(files) >= 2
        digests.append({f: hashlib.sha256((bundle / f).read_bytes()).hexdigest() for f in files})
    assert digests[0] == digests[1]
