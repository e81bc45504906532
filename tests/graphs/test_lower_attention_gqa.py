"""The gqa attention form (graphs/lower_attention_gqa.py): its structure on a real graph, its refusals, and its cache
written in place equal to the cache the onnx23 form's present outputs give, slot by slot, on ragged rows that cross
chunk boundaries (the exactness against transformers at the real chunk is tests/runtime/test_kv_cache.py's, whose
bundles use the ONNX Runtime target's default form)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from llama4_deploy.graphs import ops
from llama4_deploy.graphs.lower_attention import LowerAttentionPass
from llama4_deploy.graphs.lower_skip_norm import FuseSkipNormPass
from llama4_deploy.graphs.passes import LoweringError
from llama4_deploy.runtime import abi, load
from llama4_deploy.runtime.kv_cache import KVCache
from tests.conftest import manifest, quiet_build
from tests.graphs.test_lower_attention import _model


def test_the_bundle_attends_through_the_kernel_over_buffers_it_writes(tiny_bundle):
    assert {g["attention"] for g in manifest(tiny_bundle)["engine"]["graphs"].values()} == {"gqa"}
    model = ir.load(tiny_bundle / "native.onnx")
    graph = model.graph
    kernels = [n for n in graph if n.op_type == "GroupQueryAttention"]
    assert len(kernels) == 4 and all(n.domain == "com.microsoft" for n in kernels)
    assert not any(n.domain == ops.DOMAIN for n in graph) and ops.DOMAIN not in graph.opset_imports
    assert not any(n.op_type == "Attention" for n in graph)
    inputs = {v.name: v for v in graph.inputs}
    for node in kernels:
        layer = int(node.name.split("/")[1].removeprefix("layers."))
        # the past buffers are the graph's inputs; the present outputs have their shape (ring / context slots)
        assert node.inputs[3] is inputs[abi.past_key(layer)] and node.inputs[4] is inputs[abi.past_value(layer)]
        assert [v.name for v in node.outputs[1:]] == [abi.present_key(layer), abi.present_value(layer)]
        assert node.outputs[1].shape == inputs[abi.past_key(layer)].shape
        assert node.inputs[16] is not None  # query_seqlens: ragged rows are real tokens first, padding last
        assert node.attributes["scale"].as_float() == pytest.approx(16**-0.5)
    slots = {abi.past_key(layer): str(inputs[abi.past_key(layer)].shape[2]) for layer in range(4)}
    assert slots == {"past_key.0": "ring", "past_key.1": "ring", "past_key.2": "ring", "past_key.3": "context"}


def test_residual_adds_and_their_norms_are_one_kernel(tiny_bundle):
    # every layer's post-attention norm (4); the next layers' input norms and the head's read an add of another layer
    # (left alone: layers of a kind keep the same nodes), layer 0's reads the embedding, the QK norms have no weight
    assert manifest(tiny_bundle)["build"]["passes"]["fuse_skip_norm"] == 4
    graph = ir.load(tiny_bundle / "native.onnx").graph
    fused = [n for n in graph if n.op_type == "SkipSimplifiedLayerNormalization"]
    assert len(fused) == 4 and all(n.domain == "com.microsoft" for n in fused)
    assert all(n.attributes["epsilon"].as_float() == pytest.approx(1e-5) for n in fused)
    # the sum (output 3) carries the residual stream on, to the layer's last add
    assert all(n.outputs[3].uses() for n in fused)
    pass_ = FuseSkipNormPass()
    assert pass_(graph_copy := ir.load(tiny_bundle / "native.onnx")).count == 0  # nothing left to fuse
    assert set(pass_.skipped.values()) == {
        "the norm has no weight (a QK norm)",
        "the add and the norm are not in one layer",
    }
    del graph_copy


def test_refusals():
    model = _model()  # a lone node whose key is a graph input, not a present output
    with pytest.raises(LoweringError) as refusal:
        LowerAttentionPass("gqa")(model)
    assert str(refusal.value) == (
        "attention node /layers.0/node_attention was not lowered to gqa: it has a key or value that is not a graph "
        "output (present_key.l / present_value.l), so there is no output to share the cache buffer with"
    )
    assert [n.op_type for n in model.graph] == [ops.ATTENTION]  # nothing changed


@pytest.fixture(scope="module")
def onnx23_bundle(tmp_path_factory):
    return quiet_build("tiny", tmp_path_factory.mktemp("onnx23") / "tiny", attention="onnx23")


def test_the_in_place_cache_equals_the_written_one(tiny_bundle, onnx23_bundle):
    # tiny's chunk is 8 and its prefill step 16: ragged prompts (3, 13, 21 tokens) make steps the runtime cuts at
    # chunk boundaries, with rows idle in some parts; then 5 decode steps with one row inactive. Every cached slot
    # of every layer must hold what the onnx23 form's present outputs put there (summation order only: 1e-5),
    # and the logits agree likewise.
    rng = np.random.default_rng(11)
    prompts = [rng.integers(0, 512, size=n).tolist() for n in (3, 13, 21)]
    results = []
    for bundle in (tiny_bundle, onnx23_bundle):
        with load(bundle) as engine:
            cache = KVCache(engine.manifest, 3)
            last, _ = engine.prefill(cache, prompts)
            logits, token = [last], last.argmax(-1)
            active = np.array([True, False, True])
            for _ in range(5):
                logits.append(engine.decode_step(cache, token, active))
                token = logits[-1].argmax(-1)
            results.append((cache, np.stack(logits), engine.steps))
    (gqa, gqa_logits, gqa_steps), (written, logits, steps) = results
    assert gqa_steps > steps  # the 16-token steps were cut at the chunk boundaries (8, 16)
    assert gqa.lengths.tolist() == written.lengths.tolist() == [8, 13, 26]
    np.testing.assert_allclose(gqa_logits[0], logits[0], atol=1e-5 * np.abs(logits).max())
    # decode: row 1 is padding, its logits meaningless
    np.testing.assert_allclose(gqa_logits[1:, [0, 2]], logits[1:, [0, 2]], atol=1e-5 * np.abs(logits).max())
    for layer in range(4):
        ring = 8 if layer < 3 else 0
        for row, length in enumerate(written.lengths):
            filled = [p % ring for p in range(max(0, length - ring), length)] if ring else list(range(length))
            for buffers in ("keys", "values"):
                got = getattr(gqa, buffers)[layer][row, :, filled]
                want = getattr(written, buffers)[layer][row, :, filled]
                np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())


def test_positions_the_in_place_cache_cannot_take_are_refused(tiny_bundle):
    with load(tiny_bundle) as engine:
        cache = KVCache(engine.manifest, 1)
        engine.prefill(cache, [[1, 2, 3]])
        with pytest.raises(ValueError, match=r"row 0 feeds positions \[5\]; .* from 3 on, padding last"):
            engine.run_step(cache, np.array([[4]]), np.array([[5]]))
        assert cache.lengths.tolist() == [3]
