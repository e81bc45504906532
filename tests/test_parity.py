"""Parity against transformers' Llama4ForCausalLM, fp32, ONNX Runtime CPU.

Tolerance: max |dlogit| <= 1e-3 x max(1, max |logit|). Both sides are fp32 and differ only in
summation order (fused MatMul vs eager bmm/sdpa), which moves logits by about 1e-5 here; the
bound leaves two orders of magnitude while still catching any real error (a wrong RoPE pair,
mask or expert choice moves logits by whole units). Greedy tokens must be identical for 32 new
tokens on a ragged batch of three prompts, prefill then decode.
"""

from __future__ import annotations

import onnx_ir as ir
import pytest

from llama4_deploy.quality.verify import REL_TOLERANCE, verify


def _check(report, chunk_crossings: int = 2):
    assert report.ok, report.table()
    assert len(report.prompt_lengths) == 3 and len(set(report.prompt_lengths)) == 3  # ragged
    assert report.new_tokens == 32
    # the longest prompt alone crosses at least two chunk boundaries
    assert max(report.prompt_lengths) > chunk_crossings * report.chunk_size
    # temperature tuning is active inside the prompts
    assert report.temperature_tuning_from is not None and report.temperature_tuning_from < min(report.prompt_lengths)
    paths = {row.path for row in report.rows}
    assert paths == {"generate", "score:prefill", "score:decode"}
    assert REL_TOLERANCE == 1e-3
    for row in report.rows:
        assert row.greedy_agree == row.greedy_total
        assert row.comparison.stat == "max" and row.comparison.value <= row.comparison.tolerance


def test_tiny(tiny_bundle):
    _check(verify(str(tiny_bundle), log=lambda _: None))


def test_tiny_report_is_the_whole_model_references(tiny_bundle, monkeypatch):
    from tests.conftest import assert_verify_matches_whole_model_reference

    assert_verify_matches_whole_model_reference(tiny_bundle, monkeypatch)


@pytest.mark.parametrize("dispatch", ["dense", "gather", "capacity", "native", "auto"])
@pytest.mark.parametrize("recipe", ["tiny", "scout-mini", "maverick-mini"])
def test_every_dispatch_is_exact(recipe, dispatch, tmp_path):
    """Each MoE lowering against transformers. Capacity-limited steps that overflow are rerun on
    the exact graph; the capacity graph must still have produced some steps itself."""
    from llama4_deploy.build import build
    from tests.conftest import manifest

    bundle = build(recipe, out=tmp_path / recipe, moe_dispatch=dispatch, log=lambda _: None).bundle
    report = verify(str(bundle), log=lambda _: None)
    _check(report)
    assert {g["attention"] for g in manifest(bundle)["engine"]["graphs"].values()} == {"gqa"}
    if dispatch != "auto":
        assert report.graphs["prefill"] == report.graphs["decode"] == dispatch
    uses_capacity = "capacity" in (report.graphs["prefill"], report.graphs["decode"])
    assert ("exact" in report.graphs) == uses_capacity
    if uses_capacity:
        assert report.graphs["exact"] in ("native", "gather", "dense")
        assert report.overflow_reruns < report.steps


@pytest.mark.parametrize("recipe", ["tiny", "tiny-trained", "scout-mini", "maverick-mini"])
def test_tensorrt_form_is_exact(recipe, tmp_path):
    """The TensorRT-form bundle (build --target tensorrt: decomposed attention, standard opset-21 ops only,
    gather for decode, capacity with the gather combine for prefill, an exact graph for reruns), at float32
    compute, run here on ONNX Runtime: the very graphs TensorRT would compile, against transformers."""
    import onnx

    from llama4_deploy.build import build
    from llama4_deploy.graphs.lint_tensorrt import lint_tensorrt
    from tests.conftest import manifest

    bundle = build(recipe, out=tmp_path / recipe, target="tensorrt", compute_dtype="float32", log=lambda _: None).bundle
    report = verify(str(bundle), log=lambda _: None)
    _check(report)
    m = manifest(bundle)
    assert m["engine"]["backend"] == "tensorrt" and m["engine"]["compute_dtype"] == "float32"
    assert report.graphs["prefill"] == "capacity" and report.graphs["decode"] == "gather"
    assert report.graphs["exact"] in ("gather", "dense") and report.overflow_reruns < report.steps
    assert {g["attention"] for g in m["engine"]["graphs"].values()} == {"decomposed"}
    assert set(m["engine"]["tensorrt"]["profiles"]) == {g["file"] for g in m["engine"]["graphs"].values()}
    for file in {g["file"] for g in m["engine"]["graphs"].values()}:
        proto = onnx.load(bundle / file, load_external_data=False)
        assert {o.domain: o.version for o in proto.opset_import} == {"": 21}
        ops = {n.op_type for n in proto.graph.node}
        assert not ops & {"Attention", "ScatterND", "MoE"} and all(n.domain == "" for n in proto.graph.node)
        assert lint_tensorrt(ir.load(bundle / file), topk_bound=1024) == []


def test_sharded_multimodal_checkpoint(checkpoint_bundle, checkpoint_dir):
    from tests.conftest import manifest

    assert manifest(checkpoint_bundle)["source"] == {"kind": "checkpoint", "path": str(checkpoint_dir.resolve())}
    assert len(list(checkpoint_dir.glob("model-*.safetensors"))) > 1  # really sharded
    _check(verify(str(checkpoint_bundle), log=lambda _: None))
