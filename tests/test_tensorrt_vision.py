"""The TensorRT form of a vision bundle (`build --recipe tiny-vision --target tensorrt`): its vision graph, embedding
step and embeddings prefill graphs pass TensorRT 10.15's parser lint, verify on ONNX Runtime (the same graphs, image
rows included, at the fp32 bounds of quality/verify.py), and carry the optimization profiles `compile` builds their
plans with (tiles 1 ... images per step x (max_patches + 1)). TensorRT itself is not installable here; the plans are
built only on the GPU machine (tests/test_compile.py)."""

from __future__ import annotations

import json

import onnx_ir as ir
import pytest

from llama4_deploy.build import build
from llama4_deploy.build.recipe import load_recipe
from llama4_deploy.graphs.lint_tensorrt import lint_tensorrt
from llama4_deploy.quality.verify import verify
from llama4_deploy.runtime import abi
from llama4_deploy.targets import tensorrt_compile
from llama4_deploy.targets.tensorrt import topk_bound


@pytest.fixture(scope="module")
def trt_vision(tmp_path_factory):
    out = tmp_path_factory.mktemp("trt-vision") / "b"
    return build("tiny-vision", out=out, target="tensorrt", precision="fp32", log=lambda _: None).bundle


def test_tensorrt_form_vision_bundle_lints_and_verifies(trt_vision):
    manifest = json.loads((trt_vision / "manifest.json").read_text())
    vision, record = manifest["engine"]["vision"], manifest["engine"]["tensorrt"]
    graphs = [vision["file"], vision["embed"], vision["prefill"], vision["exact"]]
    assert graphs == ["vision.onnx", "embed.onnx", "embeds.capacity.onnx", "embeds.dense.onnx"]
    # the capacity graph's TopK is bounded as the build bounds it (slots per expert at max_batch x prefill_tokens)
    bound = topk_bound(manifest["profiles"], manifest["model"], load_recipe("tiny-vision").capacity_factor)
    for graph in graphs:
        assert lint_tensorrt(ir.load(trt_vision / graph), topk_bound=bound) == [], graph
    report = verify(str(trt_vision), log=lambda _: None, new_tokens=8, perplexity=False)
    assert report.ok, report.table()
    image_rows = [row.path for row in report.rows if row.path.startswith(("vision", "image"))]
    assert image_rows == ["vision 1x1", "vision 1x2", "vision 2x2", "image 2x2", "image 1x1+2x2"]
    # what compile is asked for: a plan per graph file, the vision graph's tiles bounded by the recipe's 2 images per
    # step x (4 patches + the global tile), optimized for one image of 5 tiles
    plans = tensorrt_compile.planned_files(record)
    assert {graph: plans[graph] for graph in graphs} == {
        "vision.onnx": "vision.plan",
        "embed.onnx": "embed.plan",
        "embeds.capacity.onnx": "embeds.capacity.plan",
        "embeds.dense.onnx": "embeds.dense.plan",
    }
    assert vision["max_tiles"] == 10
    (profile,) = tensorrt_compile._profiles(record["profiles"]["vision.onnx"])  # polygraphy's Profile, as compiled
    assert tuple(profile["pixel_values"]) == ([1, 3, 56, 56], [5, 3, 56, 56], [10, 3, 56, 56])
    (embed,) = tensorrt_compile._profiles(record["profiles"]["embed.onnx"])
    assert tuple(embed[abi.INPUT_IDS]) == ([1, 1], [4, 16], [4, 16])
    for graph in ("embeds.capacity.onnx", "embeds.dense.onnx"):
        (prefill,) = tensorrt_compile._profiles(record["profiles"][graph])
        assert tuple(prefill[abi.HIDDEN_IN]) == ([1, 1, 64], [4, 16, 64], [4, 16, 64])
        # every input the graph declares has its shapes in the profile (TensorRT refuses a dynamic input without)
        assert set(prefill) == {value.name for value in ir.load(trt_vision / graph).graph.inputs}
