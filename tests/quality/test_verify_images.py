"""verify's image rows on tiny-vision bundles built at fp16, FP8 and INT4 (quality/images.py).

The vision rows keep the fp32 tolerance (1e-3 x max(1, max|feature|)): the tower is float32 at every precision. The
image generation rows are checked as the text rows are at that precision: against the fake-quant simulation of the
bundle's spec (quality/verify.py SIMULATION_TOLERANCE by compute dtype; for FP8, which rounds activations, also the
rounding-tie noise floor, the typical position and the pooled greedy agreement), greedy tokens identical on this
peaked model. A damaged vision weight must make verify fail.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from llama4_deploy.build import build
from llama4_deploy.quality.verify import verify
from llama4_deploy.runtime.integrity import file_record

IMAGE_ROWS = ["vision 1x1", "vision 1x2", "vision 2x2", "image 2x2", "image 1x1+2x2"]
NEW_TOKENS = 8  # the text rows' prompts still cross chunk boundaries; 8 generated tokens keep the three builds quick


@pytest.fixture(scope="module")
def vision_bundles(tmp_path_factory):
    built = {}

    def bundle(precision: str):
        if precision not in built:
            out = tmp_path_factory.mktemp("vision-precisions") / precision
            built[precision] = build("tiny-vision", out=out, precision=precision, log=lambda _: None).bundle
        return built[precision]

    return bundle


@pytest.mark.parametrize("precision", ["fp16", "fp8", "int4"])
def test_image_rows_verify_at_every_precision(precision, vision_bundles):
    report = verify(str(vision_bundles(precision)), log=lambda _: None, new_tokens=NEW_TOKENS, perplexity=False)
    assert report.ok, report.table()
    assert report.reference == f"fake-quant simulation ({precision})"
    text = [row for row in report.rows if row.path in ("generate", "score:prefill", "score:decode")]
    images = [row for row in report.rows if row.path.startswith(("vision", "image"))]
    assert [row.path for row in images] == IMAGE_ROWS
    for row in images[3:]:  # the text rows' checks, unchanged
        assert row.greedy_agree == row.greedy_total == NEW_TOKENS
        # pooled where the spec rounds activations: fp8's, and int4's int8 ones (the ort form's default)
        assert row.greedy_pooled == text[0].greedy_pooled == (precision in ("fp8", "int4"))
        assert (row.typical is None) == (text[0].typical is None)
        assert row.comparison.tolerance >= min(t.comparison.tolerance for t in text) / 2  # same rule, similar |logit|
    for row in images[:3]:  # float32 tower: the fp32 bound
        assert row.comparison.value <= 1e-6 and row.comparison.tolerance <= 1e-3 * 2
    q = report.image_quality
    assert q is not None and q["positions"] == 2 * NEW_TOKENS
    if precision == "fp16":
        assert q["min_cosine"] > 0.999  # as the text rows: fp16 loses next to nothing here
    assert "image prompts: quality against transformers fp32" in report.table()


def _scale_initializer(graph_path, name: str, factor: float) -> None:
    """Multiply one external float32 initializer of an ONNX graph by `factor` in its data file."""
    model = onnx.load(str(graph_path), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.name == name)
    where = {entry.key: entry.value for entry in tensor.external_data}
    data_path = graph_path.parent / where["location"]
    offset, length = int(where["offset"]), int(where["length"])
    with open(data_path, "r+b") as f:
        f.seek(offset)
        values = np.frombuffer(f.read(length), dtype=np.float32) * factor
        f.seek(offset)
        f.write(values.astype(np.float32).tobytes())


def test_damaged_vision_weight_fails_verify(vision_bundles, tmp_path):
    """The vision tower's positional embedding scaled by 1.5 (and the bundle's hashes rewritten, so integrity passes
    and the numbers are what is checked): the feature rows and the image generation rows fail at FP8, the text rows
    still pass."""
    bundle = tmp_path / "damaged"
    shutil.copytree(vision_bundles("fp8"), bundle)
    _scale_initializer(bundle / "vision.onnx", "embed.positional_embedding", 1.5)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["vision.onnx.data"] = file_record(bundle / "vision.onnx.data")
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    report = verify(str(bundle), log=lambda _: None, new_tokens=NEW_TOKENS, perplexity=False)
    assert not report.ok
    failed = {row.path for row in report.rows if not row.ok}
    assert {"vision 1x1", "vision 1x2", "vision 2x2"} <= failed, report.table()
    assert failed & {"image 2x2", "image 1x1+2x2"}, report.table()
    assert not failed & {"generate", "score:prefill", "score:decode"}, report.table()


@pytest.fixture(scope="module")
def std002_vision(tmp_path_factory):
    """tiny-vision's text and vision configs at transformers' initialization (std 0.02, no peaked gains): where
    quality means something, as tests/test_quantize_parity.py's std-0.02 text checkpoint (its config, seed 3). The
    projector alone is drawn at unit gain (export/reference.py random_multimodal), so images move the logits."""
    from llama4_deploy.build.recipe import load_recipe
    from llama4_deploy.export.reference import write_random_multimodal

    random = load_recipe("tiny-vision").random.model_dump(mode="json")
    random.update(seed=3, logit_gain=1.0, router_gain=1.0)
    directory = tmp_path_factory.mktemp("std002-vision") / "ckpt"
    directory.mkdir()
    write_random_multimodal(random, directory)
    return directory


@pytest.mark.parametrize("precision", ["fp8", "int4"])
def test_image_prompts_meet_the_quality_floors_at_std_002(precision, std002_vision, tmp_path):
    """The text path's public quality floors (tests/test_quantize_parity.py FLOORS: FP8 min cosine >= 0.98 and max
    KL <= 0.005, INT4 >= 0.90 and <= 0.03), unchanged, on prompts with one image and with two: the engine's logits
    at the generated positions against Llama4ForConditionalGeneration in fp32."""
    from llama4_deploy.export.reference import multimodal_logits, multimodal_reference
    from llama4_deploy.export.simulate import quality
    from llama4_deploy.quality.images import test_images
    from llama4_deploy.runtime import images as im
    from llama4_deploy.runtime import load
    from tests.test_quantize_parity import FLOORS

    bundle = build(checkpoint=std002_vision, out=tmp_path / precision, precision=precision, log=lambda _: None).bundle
    model = multimodal_reference({"kind": "checkpoint", "path": str(std002_vision)})
    with load(bundle) as engine:
        spec, tokens = engine.image_spec, engine.image_tokens
        pictures = [picture for _, picture in test_images(spec.tile_size, spec.max_patches)]
        prompts = [[3, 4, tokens.image, 5, 6], [7, tokens.image, 8, tokens.image, 9]]
        given = [[pictures[-1]], [pictures[0], pictures[-1]]]
        result = engine.generate(prompts, 16, images=given, stop_tokens=[], return_logits=True)
    expected = []
    for prompt, images, new in zip(prompts, given, result.tokens):
        prepared = [im.preprocess(picture, spec) for picture in images]
        ids = im.expand_placeholders(prompt, prepared, spec.tokens_per_tile, tokens)
        pixels = np.concatenate([p.pixel_values for p in prepared])
        expected.append(multimodal_logits(model, ids + new, pixels, len(ids))[len(ids) - 1 : len(ids) - 1 + len(new)])
    q = quality(np.concatenate(result.logits), np.concatenate(expected))
    min_cosine, max_kl = FLOORS[precision]
    assert q["min_cosine"] >= min_cosine and q["max_kl"] <= max_kl, q
    print(f"{precision} image prompts: {q}")  # greedy agreement reported, not floored: at std 0.02 top logits tie
