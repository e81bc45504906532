"""`build --target tensorrt`: quantized TensorRT-form bundles verified on ONNX Runtime (float32 compute,
against the fake-quant simulation of their own spec: verify.SIMULATION_TOLERANCE, greedy tokens
identical), their layout (per-expert 2-D DequantizeLinear, no ScatterND), and the refusals."""

from __future__ import annotations

import pytest

from llama4_deploy.quality.verify import verify
from tests.conftest import manifest
from tests.test_cli import invoke, user_error


# block None: the target's default, 128 with float activations (TensorRT's INT4 DequantizeLinear: blocks of 64 or 128)
@pytest.mark.parametrize("precision, block", [("int4", 64), ("int4", None), ("fp8", None)])
def test_quantized_tensorrt_form_matches_its_simulation(precision, block, tmp_path):
    import onnx_ir as ir

    from llama4_deploy.build import build
    from llama4_deploy.graphs.lint_tensorrt import lint_tensorrt

    bundle = build(
        "tiny",
        out=tmp_path / precision,
        target="tensorrt",
        precision=precision,
        block_size=block,
        compute_dtype="float32",
        log=lambda _: None,
    ).bundle
    report = verify(str(bundle), log=lambda _: None)
    assert report.ok, report.table()
    assert report.reference == f"fake-quant simulation ({precision})"
    m = manifest(bundle)
    assert m["engine"]["quant_form"] == "qdq" and m["engine"]["backend"] == "tensorrt"
    model = ir.load(bundle / m["engine"]["graphs"]["decode"]["file"])
    weight_dqs = [n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None]
    # tiny: 8 experts x (gate_up, down) on 2 MoE layers, one 2-D constant each; + 4 x (q, k, v, o), shared, mlp
    assert len(weight_dqs) == 2 * 2 * 8 + 4 * 4 + 2 * 3 + 2 * 3
    assert {len(n.inputs[0].shape) for n in weight_dqs} == {2}
    if precision == "int4":
        assert {n.attributes["block_size"].as_int() for n in weight_dqs} == {block or 128}
        rules = m["engine"]["quantization"]["rules"]
        assert [(r["block_size"], r["activation"]) for r in rules] == [(block or 128, "none")]
    assert lint_tensorrt(model, topk_bound=1024) == []


@pytest.mark.parametrize(
    "flags, words",
    [
        (("--precision", "int4", "--block-size", "32"), ("int4 block 32", "64 or 128")),
        (("--precision", "int4", "--quant-form", "ort"), ("ort quantization form", "--quant-form qdq")),
        (("--attention", "onnx23"), ("--attention decomposed",)),
        (("--attention", "gqa"), ("GroupQueryAttention", "--attention decomposed")),
        (("--moe-dispatch", "native"), ("com.microsoft.MoE",)),
    ],
)
def test_target_refuses_what_tensorrt_cannot_run(flags, words, tmp_path):
    user_error(invoke("build", "--recipe", "tiny", "--target", "tensorrt", *flags, "--out", tmp_path / "b"), *words)
    assert not (tmp_path / "b").exists()
