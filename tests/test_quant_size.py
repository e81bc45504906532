"""Bundle size at the stored precision (issue targets): FP8 <= 0.30x and INT4 <= 0.18x the fp32 bundle, for
scout-mini and maverick-mini, in every form ONNX Runtime gets (auto dispatch, the recipes' default).

The INT4 qdq bundles hold a native prefill graph and a gather decode graph; the gather reads the native graph's
expert weights (graphs/lower_moe_gather.py, layout "native"), so the experts are stored once. Sizes are every
file of the bundle (graphs, weights, golden outputs, manifest), as `make quant-report` counts them.
"""

from __future__ import annotations

import onnx_ir as ir
import pytest

from llama4_deploy.build import build
from tools.bench import bundle_bytes

TARGETS = {"fp8": 0.30, "int4": 0.18}
CHOICES = [("fp8", None), ("int4", "qdq"), ("int4", "ort")]


@pytest.fixture(scope="module")
def fp32_bytes(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp32")
    return {
        name: bundle_bytes(build(name, out=root / name, log=lambda _: None).bundle)
        for name in ("scout-mini", "maverick-mini")
    }


@pytest.mark.parametrize("precision,form", CHOICES, ids=["fp8", "int4-qdq", "int4-ort"])
@pytest.mark.parametrize("name", ["scout-mini", "maverick-mini"])
def test_size_against_fp32(name, precision, form, fp32_bytes, tmp_path):
    bundle = build(name, out=tmp_path / "q", precision=precision, quant_form=form, log=lambda _: None).bundle
    ratio = bundle_bytes(bundle) / fp32_bytes[name]
    assert ratio <= TARGETS[precision], f"{name} {precision} {form}: {ratio:.3f}x the fp32 bundle"
    assert ratio > {"fp8": 0.25, "int4": 0.125}[precision]  # no weight went missing: 8 / 4 bits of 32, plus scales


def test_int4_qdq_stores_the_experts_once(tmp_path):
    """maverick-mini int4 qdq: auto picks native for prefill and gather for decode, and both graphs dequantize the
    same INT4 expert tensors (one name each in the shared weights file), none in the matmul layout."""
    bundle = build("maverick-mini", out=tmp_path / "q", precision="int4", quant_form="qdq", log=lambda _: None).bundle
    native, gather = (ir.load(bundle / f"{s}.onnx").graph for s in ("native", "gather"))
    experts = {g: {n for n in graph.initializers if ".experts_" in n} for g, graph in (("n", native), ("g", gather))}
    assert experts["n"] == experts["g"] and experts["n"]
    assert all(".native_fc1." in n or ".native_fc2." in n for n in experts["g"])
    assert [n.op_type for n in gather if n.name.endswith("/experts/GatherGateUp")]  # a gather graph indeed
