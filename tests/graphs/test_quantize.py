"""The quantization spec and its numbers; the ort form's kernels against the qdq form on one MatMul.

Tolerance: MatMulNBits dequantizes exactly the same (stored - 8) * scale as DequantizeLinear's
q * scale, so the two differ by float32 summation order only (1e-5 at these sizes, bound 1e-4).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from llama4_deploy.graphs.quantize import QuantConfig, fake_quant, fp8_channel, int4_blocked, make_spec, pack_int4_rows


def _weight_model(op_type: str, x_shape, name: str, w: np.ndarray) -> ir.Model:
    """y = op(x, w) with `w` the initializer `name`, in the node scope its layer gives it."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(x_shape))
    weight = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(w.shape))
    weight.const_value = ir.tensor(w, name=name)
    layer = ".".join(name.split(".")[:2])
    node = ir.node(op_type, [x, weight], name=f"/{layer}/{op_type}")
    node.outputs[0].name = "y"
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[weight], opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


def test_presets_name_the_linear_layers_only():
    spec = make_spec(QuantConfig(precision="int4"))
    assert spec.form == "ort" and spec.compute_dtype == "float32" and spec.rules[0].block_size == 128
    for name in (
        "layers.0.q",
        "layers.3.o",
        "layers.1.experts_gate_up",
        "layers.1.experts_down.native_fc2",
        "layers.2.shared_up",
        "layers.0.mlp_down",
    ):
        assert spec.rule_for(name) is not None, name
    for name in ("layers.1.router", "embed.embed", "head.lm_head", "layers.0.input_norm", "layers.0.rope_rotation"):
        assert spec.rule_for(name) is None, name
    fp8 = make_spec(QuantConfig(precision="fp8"))
    assert fp8.form == "qdq" and fp8.activations and fp8.rules[0].granularity == "channel"
    assert make_spec(QuantConfig(precision="fp16")).compute_dtype == "float16"
    assert not make_spec(QuantConfig(precision="bf16")).quantized


@pytest.mark.parametrize(
    "config, message",
    [
        (QuantConfig(precision="int4", block_size=48), "block size 48"),
        (QuantConfig(precision="fp8", form="ort"), "fp8 has no ONNX Runtime"),
        (QuantConfig(precision="fp32", form="ort"), "quantizes nothing"),
        (QuantConfig(precision="int4", form="qdq", int4_compute="int8"), "needs --precision int4 and the ort form"),
        (QuantConfig(precision="fp8", method="awq"), "awq is for int4"),
        (QuantConfig(precision="int4", form="qdq", int8_weights=("v",)), "needs --precision int4 and the ort form"),
    ],
)
def test_bad_combinations_refuse(config, message):
    with pytest.raises(ValueError, match=message):
        make_spec(config)


def test_int8_weights_numbers_and_rule_order():
    """--int8-weights: symmetric 8-bit blocks (amax / 127) for the named projections, before the int4 rule that
    names every linear layer (a weight takes the first rule naming it); packed as q + 128, one per byte."""
    from llama4_deploy.graphs.quantize import int_blocked, pack_int8_rows

    w = np.array([[1.27, -0.5], [0.01, 0.25], [-0.635, 0.0], [0.0, 0.0]], dtype=np.float32)  # [K=4, N=2]
    q, scale = int_blocked(w, axis=0, block=2, bits=8)
    np.testing.assert_allclose(scale, [[0.01, 0.5 / 127], [0.005, 1.0]], rtol=1e-6)
    np.testing.assert_array_equal(q, [[127, -127], [1, 64], [-127, 0], [0, 0]])
    np.testing.assert_array_equal(pack_int8_rows(q.T, 2), [[[255, 129], [1, 128]], [[1, 192], [128, 128]]])
    spec = make_spec(QuantConfig(precision="int4", block_size=32, int8_weights=("v", "o")))
    assert [(r.weight, r.block_size) for r in spec.rules] == [("int8", 32), ("int4", 32)]
    assert spec.rule_for("layers.2.v").weight == "int8" and spec.rule_for("layers.2.o").weight == "int8"
    assert spec.rule_for("layers.2.q").weight == "int4" and spec.rule_for("layers.2.experts_down").weight == "int4"
    assert "int8 block 32 (rtn) on layers.*.v, layers.*.o" in spec.summary()


def test_int4_numbers():
    w = np.array([[0.7, -1.4], [0.1, 0.2], [-0.35, 0.0], [0.0, 0.0]], dtype=np.float32)  # [K=4, N=2]
    q, scale = int4_blocked(w, axis=0, block=2)
    assert scale.shape == (2, 2) and q.dtype == np.int8
    np.testing.assert_allclose(scale, [[0.1, 0.2], [0.05, 1.0]], rtol=1e-6)  # amax / 7; 1 for an all-zero block
    np.testing.assert_array_equal(q, [[7, -7], [1, 1], [-7, 0], [0, 0]])
    # a partial last block (K=3, block 2) and packing: stored q + 8, low nibble first
    q3, _ = int4_blocked(w[:3], axis=0, block=2)
    packed = pack_int4_rows(q3.T, 2)  # [N, blocks, 1]
    assert packed.shape == (2, 2, 1)
    assert packed[0, 0, 0] == (7 + 8) | ((1 + 8) << 4) and packed[0, 1, 0] == (-7 + 8) | (8 << 4)


def _int4_reference(w, axis, block, compute_dtype):
    """int4_blocked in plain numpy, whole array at once: the definition the streamed, slabbed, torch one must equal."""
    from llama4_deploy.graphs.quantize import _rounded_scale

    moved = np.moveaxis(w, axis, -1)
    k, blocks = moved.shape[-1], -(-moved.shape[-1] // block)
    padded = np.zeros(moved.shape[:-1] + (blocks * block,), dtype=np.float32)
    padded[..., :k] = moved
    grouped = padded.reshape(moved.shape[:-1] + (blocks, block))
    s = _rounded_scale(np.abs(grouped).max(-1), 7, compute_dtype)
    q = np.clip(np.rint(grouped / s[..., None]), -8, 7).reshape(padded.shape)[..., :k].astype(np.int8)
    return np.moveaxis(q, -1, axis), np.moveaxis(s, -1, axis)


@pytest.mark.parametrize(
    "shape, axis, block, compute_dtype",
    [
        ((6, 300, 5), 1, 128, "float32"),  # experts-like, reduction axis in the middle, a partial last block
        ((6, 5, 256), 2, 64, "float16"),  # reduction axis last; scales rounded to fp16
        ((260, 7), 0, 32, "float32"),  # a 2-D linear, reduction axis first
        ((1100, 40, 9), 1, 32, "float32"),  # more than one slab (SLAB_ELEMENTS / 360 rows each)
    ],
)
def test_int4_blocked_equals_its_numpy_definition(shape, axis, block, compute_dtype, monkeypatch):
    from llama4_deploy.graphs import quantize

    monkeypatch.setattr(quantize, "SLAB_ELEMENTS", 1 << 17)
    rng = np.random.default_rng(0)
    # half-integers in [-7, 7]: a block holding a 7 has scale 1 and exact ties (x.5), where round-half-to-even
    # decides; a block whose |max| is smaller has an inexact scale
    w = (rng.integers(-14, 15, shape) / 2).astype(np.float32)
    q, scale = int4_blocked(w, axis, block, compute_dtype)
    want_q, want_scale = _int4_reference(w, axis, block, compute_dtype)
    np.testing.assert_array_equal(scale, want_scale)
    np.testing.assert_array_equal(q, want_q)


def test_fp8_numbers():
    import ml_dtypes

    w = np.array([[1.0, -2.0], [448.0 / 512, 0.5]], dtype=np.float32)
    q, scale = fp8_channel(w, axis=0)
    assert q.dtype == ml_dtypes.float8_e4m3fn and scale.shape == (1, 2)
    np.testing.assert_allclose(scale, [[1.0 / 448, 2.0 / 448]], rtol=1e-6)
    np.testing.assert_allclose(fake_quant(w, make_spec(QuantConfig(precision="fp8")).rules[0], 0), w, rtol=2**-3)


def node_attribute(model: ir.Model, name: str) -> int:
    return next(iter(model.graph)).attributes[name].as_int()


def _matmul_model(w: np.ndarray) -> ir.Model:
    return _weight_model("MatMul", (3, w.shape[0]), "layers.0.q", w)


@pytest.mark.parametrize("form", ["qdq", "ort", "ort-int8", "ort-w8", "ort-w8-int8"])
@pytest.mark.parametrize("block", [32, 128])
def test_matmul_forms_compute_the_spec(form, block):
    """ort-int8: MatMulNBits with accuracy_level 4 quantizes x to int8 per row and block; the spec's
    fake_quant_int8_blocks computes the same int8 values, so the two again differ by summation order only.
    w8: the weight kept at 8 bits (--int8-weights): MatMulNBits bits=8, (stored - 128) * scale."""
    import onnxruntime as ort

    from llama4_deploy.graphs.passes import run_passes
    from llama4_deploy.graphs.quant_pass import quantize_passes
    from llama4_deploy.graphs.quantize import fake_quant_int8_blocks

    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.02, (96, 40)).astype(np.float32)  # K=96: a partial last block at 64 and 128
    x = rng.normal(0, 1, (3, 96)).astype(np.float32)
    form, _, compute = form.partition("-")
    bits, compute = (8, compute[3:]) if compute.startswith("w8") else (4, compute)
    config = QuantConfig(
        precision="int4",
        block_size=block,
        form=form,
        int4_compute=compute or "float",
        int8_weights=("q",) if bits == 8 else (),
    )
    spec = make_spec(config)
    model = _matmul_model(w)
    counts = run_passes(model, quantize_passes(spec))
    ops = [n.op_type for n in model.graph]
    if form == "ort":
        assert counts == {"quantize_ort": 1, "quantize_qdq": 0} and ops == ["MatMulNBits"]
        assert node_attribute(model, "bits") == bits and spec.rule_for("layers.0.q").weight == f"int{bits}"
    else:
        assert counts == {"quantize_qdq": 1} and ops == ["DequantizeLinear", "MatMul"]
        assert model.graph.initializers["layers.0.q.int4"].dtype == ir.DataType.INT4
    options = ort.SessionOptions()  # as the runtime's runner: ORT's own DQ->MatMulNBits fusion keeps float activations
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    rule = spec.rule_for("layers.0.q")
    expected = (fake_quant_int8_blocks(x, block) if compute else x) @ fake_quant(w, rule, 0)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    if compute:
        assert (
            node_attribute(model, "accuracy_level") == 4 and np.abs(x @ fake_quant(w, rule, 0) - expected).max() > 1e-3
        )
        # without prepacked weights ONNX Runtime 1.32 multiplies in float instead: why verify and the golden step
        # prepack an int8-activation bundle (llama4_deploy/quality/verify.py)
        options.add_session_config_entry("session.disable_prepacking", "1")
        unpacked = ort.InferenceSession(
            ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"]
        ).run(None, {"x": x})[0]
        np.testing.assert_allclose(unpacked, x @ fake_quant(w, rule, 0), atol=1e-4)
    # quantization did change the numbers (8-bit weights by a sixteenth of 4-bit's rounding)
    assert np.abs(x @ w - expected).max() > (1e-3 if bits == 4 else 1e-4)


@pytest.mark.parametrize("precision", ["int4", "fp8"])
def test_per_expert_layout_is_the_stacked_numbers(precision):
    """TensorRT's layout (one 2-D DequantizeLinear per expert, stacked back) computes exactly what the
    3-D DequantizeLinear computes, on a batched expert MatMul [E, T, K] x [E, K, N]."""
    import onnxruntime as ort

    from llama4_deploy.graphs.passes import run_passes
    from llama4_deploy.graphs.quant_pass import quantize_passes

    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.02, (4, 96, 24)).astype(np.float32)  # [E, K, N]
    x = rng.normal(0, 1, (4, 3, 96)).astype(np.float32)
    spec = make_spec(QuantConfig(precision=precision, block_size=64, form="qdq"))
    outs = {}
    for per_expert in (False, True):
        model = _weight_model("MatMul", x.shape, "layers.1.experts_down", w)
        run_passes(model, quantize_passes(spec, {"layers.1.experts_down": 3.0}, per_expert=per_expert))
        dqs = [n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None]
        assert len(dqs) == (4 if per_expert else 1)
        assert {len(n.inputs[0].shape) for n in dqs} == {2 if per_expert else 3}
        session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
        outs[per_expert] = session.run(None, {"x": x})[0]
    np.testing.assert_array_equal(outs[True], outs[False])
    assert np.abs(outs[True] - x @ w).max() > 1e-4  # quantized for real


def test_a_weight_neither_form_can_quantize_is_refused():
    """The qdq pass raises the build's sentence; the ort pass before it leaves such a weight alone, by design."""
    from llama4_deploy.graphs.passes import LoweringError, run_passes
    from llama4_deploy.graphs.quant_pass import quantize_passes

    w = np.random.default_rng(0).normal(0, 0.02, (3, 96)).astype(np.float32)
    model = _weight_model("Add", (3, 96), "layers.0.q", w)
    spec = make_spec(QuantConfig(precision="int4", block_size=32))
    assert spec.form == "ort"
    with pytest.raises(LoweringError) as refusal:
        run_passes(model, quantize_passes(spec))
    assert str(refusal.value) == (
        "weight layers.0.q was not quantized to int4: it is read by Add (input 1), not as a MatMul weight"
    )


def test_the_ort_form_leaves_what_its_kernels_cannot_take_to_qdq():
    """A 3-D weight outside the MoE kernel: MatMulNBits takes only 2-D ones, so the qdq pass quantizes it."""
    from llama4_deploy.graphs.passes import run_passes
    from llama4_deploy.graphs.quant_pass import quantize_passes

    w = np.random.default_rng(1).normal(0, 0.02, (4, 64, 24)).astype(np.float32)  # [E, K, N]
    model = _weight_model("MatMul", (4, 3, 64), "layers.1.experts_down", w)
    counts = run_passes(model, quantize_passes(make_spec(QuantConfig(precision="int4", block_size=32))))
    assert counts == {"quantize_ort": 0, "quantize_qdq": 1}
    assert [n.op_type for n in model.graph] == ["DequantizeLinear", "MatMul"]
