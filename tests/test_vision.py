"""Images end to end: a multimodal checkpoint the tests write (tests/vision_fixtures.py) builds a bundle with a vision
engine; its features, and generation with images, against transformers' Llama4ForConditionalGeneration.

Tolerances: the vision engine's features and the logits within 1e-3 x max(1, max |value|), the text path's fp32
rule (quality/verify.py REL_TOLERANCE: summation order only), greedy tokens identical.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from llama4_deploy.runtime import images as im
from tests.vision_fixtures import write_vision_checkpoint

REL = 1e-3


@pytest.fixture(scope="session")
def vision_checkpoint(tmp_path_factory):
    return write_vision_checkpoint(tmp_path_factory.mktemp("vision") / "mm", seed=3)


def _picture(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def test_bundle_records_the_vision_engine(vision_bundle):
    manifest = json.loads((vision_bundle / "manifest.json").read_text())
    vision = manifest["engine"]["vision"]
    assert vision["tokens_per_tile"] == 4 and vision["max_tiles"] == 2 * (4 + 1)
    assert vision["image"]["tile_size"] == 56 and vision["image"]["max_patches"] == 4
    assert vision["tokens"]["<|patch|>"] == 509  # config.json's image_token_index
    for name in ("vision.onnx", "vision.onnx.data", vision["embed"], vision["prefill"]):
        assert name in manifest["files"]  # hashed, so load checks them


def test_features_equal_get_image_features(vision_engine, multimodal_model):
    import torch

    from llama4_deploy.export.vision import reference_features

    for shape in ((56, 56), (56, 112), (150, 130)):  # grids 1x1, 1x2 (+ global), 2x2 (+ global)
        prepared = im.preprocess(_picture(*shape, seed=shape[1]), vision_engine.image_spec)
        got = vision_engine.encode_images([prepared]).reshape(prepared.tiles, 4, -1)
        want = reference_features(multimodal_model, torch.from_numpy(prepared.pixel_values)).numpy()
        assert np.abs(got - want).max() <= REL * max(1.0, np.abs(want).max()), shape


def _reference_logits(multimodal_model, ids, pixel_values, prompt_length=None):
    from llama4_deploy.export.reference import multimodal_logits

    return multimodal_logits(multimodal_model, ids, pixel_values, prompt_length)


def test_generate_with_images_equals_reference(vision_engine, multimodal_model):
    """A ragged batch: one prompt with two images (grids 2x2 and 1x1), one with none, one with a 1x2 image; greedy
    tokens identical to the reference's argmax over the same sequences, logits within tolerance."""
    engine = vision_engine
    image = engine.image_tokens.image
    prompts = [[11, 12, image, 13, 14, image, 15], [21, 22, 23, 24], [31, image, 32, 33]]
    pictures = [[_picture(120, 110, 1), _picture(40, 50, 2)], [], [_picture(56, 112, 3)]]
    new = 6
    result = engine.generate(prompts, new, images=pictures, stop_tokens=[], return_logits=True)
    grids = []
    for prompt, given, tokens, logits in zip(prompts, pictures, result.tokens, result.logits):
        prepared = [im.preprocess(p, engine.image_spec) for p in given]
        grids.append([p.aspect_ratio for p in prepared])
        ids = im.expand_placeholders(prompt, prepared, engine.image_spec.tokens_per_tile, engine.image_tokens)
        pixels = np.concatenate([p.pixel_values for p in prepared]) if prepared else None
        expected = _reference_logits(multimodal_model, ids + tokens, pixels, len(ids))
        expected = expected[len(ids) - 1 : len(ids) - 1 + len(tokens)]
        assert tokens == expected.argmax(-1).tolist()
        assert np.abs(logits - expected).max() <= REL * max(1.0, np.abs(expected).max())
    assert grids == [[(2, 2), (1, 1)], [], [(1, 2)]]


def test_images_change_the_answer(vision_engine):
    """Two different images in the same prompt give different first-token logits: the features reach the decoder."""
    engine = vision_engine
    prompt = [5, engine.image_tokens.image, 6, 7]
    a = engine.generate([prompt], 1, images=[[_picture(56, 56, 8)]], return_logits=True).logits[0]
    b = engine.generate([prompt], 1, images=[[_picture(56, 56, 9)]], return_logits=True).logits[0]
    assert np.abs(a - b).max() > 1e-2


def test_tiny_vision_recipe_builds_and_verifies(vision_bundle, monkeypatch):
    """The random multimodal recipe: its text rows and its image rows (features for grids 1x1, 1x2, 2x2; generation
    with one image and with two of different grids) pass against Llama4ForConditionalGeneration."""
    from llama4_deploy.quality import verify as verify_module

    monkeypatch.setattr(verify_module, "_perplexity", lambda *args: None)
    report = verify_module.verify(str(vision_bundle), log=lambda _: None, new_tokens=8)
    assert report.ok, report.table()
    image_rows = [row for row in report.rows if row.path.startswith(("vision", "image"))]
    assert [row.path for row in image_rows] == [
        "vision 1x1",
        "vision 1x2",
        "vision 2x2",
        "image 2x2",
        "image 1x1+2x2",
    ]
    assert all(row.greedy_agree == row.greedy_total == 8 for row in image_rows if row.path.startswith("image"))


def test_checkpoint_written_by_save_pretrained_reads_as_the_recipe(vision_checkpoint, vision_bundle):
    """A multimodal checkpoint as transformers writes it (weights, Llama4Processor's processor_config.json and
    preprocessor_config.json, a tokenizer with the image tokens) gives the build the same vision engine record as
    the tiny-vision recipe's own files; the recipe's processor_config.json is what Llama4Processor writes."""
    from llama4_deploy.build.recipe import load_recipe
    from llama4_deploy.build.stages import Stage
    from llama4_deploy.build.steps.load import vision_plan
    from llama4_deploy.export.checkpoint import Checkpoint
    from llama4_deploy.export.reference import random_processor_config

    names = {p.name for p in vision_checkpoint.iterdir()}
    assert {"processor_config.json", "preprocessor_config.json", "tokenizer.json", "config.json"} <= names
    checkpoint = Checkpoint(vision_checkpoint)
    plan = vision_plan(load_recipe("tiny-vision"), checkpoint, vision_checkpoint, [Stage(0, 0, 4, 1)], lambda _: None)
    recorded = json.loads((vision_bundle / "manifest.json").read_text())["engine"]["vision"]
    assert plan.image == recorded["image"] and plan.tokens == recorded["tokens"]
    assert plan.max_tiles == recorded["max_tiles"] and plan.shape.tokens_per_tile == recorded["tokens_per_tile"]
    theirs = json.loads((vision_checkpoint / "processor_config.json").read_text())
    assert random_processor_config(load_recipe("tiny-vision").random.model_dump(mode="json")) == theirs


def test_published_vision_config_is_checked():
    from llama4_deploy.build.recipe import load_recipe
    from llama4_deploy.export.vision import PUBLISHED_VISION, VisionShape, published_mismatches

    published = dict(
        PUBLISHED_VISION,
        intermediate_size=5632,
        projector_input_dim=4096,
        projector_output_dim=4096,
        vision_output_dim=4096,
        rope_parameters={"rope_theta": 10000.0},
    )
    shape = VisionShape.from_config({"vision_config": published, "text_config": {"hidden_size": 5120}})
    assert published_mismatches(shape) == [] and shape.tokens_per_tile == 144
    tiny = VisionShape.from_config({"vision_config": dict(published, num_hidden_layers=2), "text_config": {}})
    assert published_mismatches(tiny) == [
        "vision_config.num_hidden_layers 2 (published 34)",
        "projector output 0 (published 5120)",
    ]
    assert load_recipe("scout").expect_vision and load_recipe("maverick").expect_vision
    assert not load_recipe("tiny-vision").expect_vision


def test_run_with_image_equals_generate(vision_bundle, vision_engine, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from llama4_deploy.cli import main
    from llama4_deploy.runtime.tokenizer import load_tokenizer

    path = tmp_path / "picture.png"
    Image.fromarray(_picture(90, 130, 5)).save(path)
    prompt = "w3 w4 <|image|> w5"
    result = CliRunner().invoke(
        main, ["run", str(vision_bundle), "--prompt", prompt, "--image", str(path), "--max-new-tokens", "5"]
    )
    assert result.exit_code == 0, result.output
    tokenizer = load_tokenizer(vision_engine.manifest)
    ids = tokenizer.encode(prompt)
    assert vision_engine.image_tokens.image in ids
    expected = vision_engine.generate([ids], 5, images=[[str(path)]]).tokens[0]
    assert result.output.strip().splitlines()[-1] == tokenizer.decode(expected)


def test_no_vision_builds_text_only(vision_checkpoint, tmp_path):
    """--no-vision: the text model alone (no vision files, no embeddings graphs); images are then refused."""
    from llama4_deploy.build import build
    from llama4_deploy.runtime import load

    bundle = build(
        checkpoint=vision_checkpoint, out=tmp_path / "text", max_context=64, vision=False, log=lambda _: None
    ).bundle
    names = {p.name for p in bundle.iterdir()}
    assert not names & {"vision.onnx", "vision.onnx.data", "embed.onnx"}
    with load(bundle) as engine:
        assert engine.vision is None
        with pytest.raises(ValueError, match="^this bundle has no vision engine .*; it takes text only$"):
            engine.generate([[1, 2, 508]], 2, images=[[_picture(20, 20, 1)]])


@pytest.mark.parametrize(
    "prompts, pictures, words",
    [
        (
            [[1, 508, 2, 508]],
            [[np.zeros((9, 9, 3), np.uint8)]],
            "prompt 0 has 2 <|image|> placeholders but 1 image was",
        ),
        ([[1, 2]], [[np.zeros((9, 9, 3), np.uint8)]], "prompt 0 has 0 <|image|> placeholders but 1 image was given"),
        ([[1, 508]], None, "prompt 0 has 1 <|image|> placeholder but 0 images were given"),
        ([[1, 509, 2]], None, "prompt 0 holds <|patch|> (id 509) tokens itself"),
        ([[1, 508]], [[b"\x89PNG broken"]], "prompt 0 image 0 cannot be decoded as an image (truncated or corrupt)"),
        ([[1, 2], [3]], [[]], "images has 1 lists for 2 prompts; give one per prompt"),
        (
            [[1] + [508] * 6],
            [[np.zeros((120, 120, 3), np.uint8)] * 6],
            "prompt 0 of 163 tokens (162 of them for 6 images) plus 4 new ones exceeds the bundle's context of 128",
        ),
    ],
    ids=["more-placeholders", "more-images", "no-images", "raw-patch", "corrupt", "lists", "context"],
)
def test_bad_image_requests_are_one_sentence(vision_engine, prompts, pictures, words):
    steps = vision_engine.steps
    with pytest.raises(ValueError) as info:
        vision_engine.generate(prompts, 4, images=pictures)
    assert words in str(info.value) and "\n" not in str(info.value)
    assert vision_engine.steps == steps  # refused before any engine step


def test_vision_config_disagreeing_with_projector_is_refused(vision_checkpoint, tmp_path):
    import shutil

    from llama4_deploy.build import BuildError, build

    checkpoint = tmp_path / "ck"
    shutil.copytree(vision_checkpoint, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    for key in ("projector_input_dim", "projector_output_dim", "vision_output_dim"):
        config["vision_config"][key] = 48
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(BuildError) as info:
        build(checkpoint=checkpoint, out=tmp_path / "out", log=lambda _: None)
    assert str(info.value) == (
        "tensor vision_model.vision_adapter.mlp.fc1.weight has shape [64, 128], but the checkpoint's vision_config "
        "implies [48, 128] (--no-vision builds the text model only)"
    )
    assert not (tmp_path / "out").exists()


def test_vision_graph_is_stamped_per_layer(vision_bundle):
    """The vision graph is linked from three templates traced once (export/vision.py: embed, one encoder layer,
    head), the layer template stamped per layer with that layer's weights, as the text layers are: each layer's
    nodes under its own scope and its weights under its own names, and the same node count in every layer."""
    import onnx_ir as ir

    graph = ir.load(vision_bundle / "vision.onnx").graph
    names = set(graph.initializers)
    for layer in (0, 1):  # tiny-vision's two encoder layers
        for weight in ("q_proj.weight", "k_proj.bias", "fc1.weight", "input_layernorm.weight"):
            assert f"layers.{layer}.{weight}" in names
    assert {"embed.patch.weight", "embed.positional_embedding", "head.projector.weight"} <= names
    per_layer = [sum(1 for node in graph if node.name.startswith(f"/layers.{layer}/")) for layer in (0, 1)]
    assert per_layer[0] == per_layer[1] > 0
    assert sum(1 for node in graph if node.name.startswith(("/embed/", "/layers.", "/head/"))) == len(graph)


def test_vision_graph_passes_the_tensorrt_lint(vision_bundle):
    """The vision graph holds only what TensorRT 10.15's ONNX parser documents (the tensorrt target lints it at
    build; the graph does not depend on the target)."""
    import onnx_ir as ir

    from llama4_deploy.graphs.lint_tensorrt import lint_tensorrt

    assert lint_tensorrt(ir.load(vision_bundle / "vision.onnx")) == []


def test_cost_prices_one_tile(vision_bundle):
    """`cost` adds the vision engine's FLOPs and weight bytes per tile; its MatMuls alone are known in closed form
    (tiny tower: 16 patches + the class token, hidden 32, 2 layers, 4 tokens out at 128 -> 64 -> 64 -> 64)."""
    from llama4_deploy.planning.costs import bundle_costs, cost_table

    rows = bundle_costs(vision_bundle)
    tile = rows[-1]
    assert (tile.point, tile.graph) == ("image tile", "vision.onnx") and tile.unresolved == 0
    tokens, d, i = 17, 32, 128
    matmuls = 2 * 16 * 588 * d + 2 * (
        2 * tokens * d * d * 4 + 2 * 2 * tokens * tokens * 16 * 2 + 2 * 2 * tokens * d * i
    )
    matmuls += 2 * 4 * i * 64 + 2 * 4 * 64 * 64 + 2 * 4 * 64 * 64
    assert matmuls <= tile.flops <= 1.5 * matmuls  # plus the element-wise ops, each one FLOP per element
    params = 588 * d + d + 17 * d + 4 * d + 2 * (4 * (d * d + d) + 2 * d * i + i + d + 4 * d) + i * 64 + 64 * 64
    params += 64 * 64  # the projector to the text width 64
    # bytes read per step: every weight once, plus the small RoPE tables each rotation reads again
    assert 4 * params <= tile.weight_bytes <= 1.05 * 4 * params
    assert "image tile    vision.onnx" in cost_table(rows)


def test_plan_adds_the_vision_engine():
    from llama4_deploy.planning.deployment import plan

    scout = plan("scout")
    assert "vision engine (34 layers at hidden 1408, tiles of 336 pixels, 144 tokens per tile" in scout
    assert "weights 0.87B parameters: 3.2 GiB as built" in scout
    assert "one image is at most 2,467 tokens" in scout  # 4x4 tiles x 144 + 16 separators + 144 + 3 markers
    assert "vision engine" in plan("tiny-vision") and "vision engine" not in plan("tiny")


def test_bench_images_runs(vision_bundle):
    """tools/bench_images.py (make bench) on the session's vision bundle: one timing of each kind, finite figures."""
    from tools.bench_images import bench

    lines = bench(vision_bundle, threads=1, repeats=1)
    assert lines[0].startswith("preprocess 1024x768 -> ") and "images/s" in lines[1]
    rows = [line.split() for line in lines[3:]]
    assert [int(row[0]) for row in rows] == [1, 10]
    assert all(float(value.rstrip("x")) > 0 for row in rows for value in row[1:])


def test_continuous_batching_with_images_equals_generate(vision_engine):
    """The scheduler (what the server runs) with image requests in the batch: each request's tokens equal
    Engine.generate on it alone; the long image prompt prefills in chunks between the other rows' decode steps."""
    from llama4_deploy.runtime.scheduler import run_requests

    engine = vision_engine
    image = engine.image_tokens.image
    prompts = [[3, image, 4, 5], [6, 7, 8], [9, image, 10, image]]
    pictures = [[_picture(150, 130, 21)], None, [_picture(40, 70, 22), _picture(56, 112, 23)]]
    requests = run_requests(engine, prompts, 5, images=pictures)
    for prompt, given, request in zip(prompts, pictures, requests):
        alone = engine.generate([prompt], 5, images=[given] if given else None, stop_tokens=[]).tokens[0]
        assert request.error is None and request.tokens == alone and len(alone) == 5
    assert requests[0].features is not None and requests[1].features is None


def test_text_prompts_keep_the_input_ids_path(vision_engine, tiny_bundle, monkeypatch):
    """A vision bundle's text-only prompts run the text graphs (never the embedding step) and give what the tiny
    recipe's text-only bundle gives: tiny-vision's text model is tiny's."""
    from llama4_deploy.runtime import load

    def no_embeddings(*args):
        raise AssertionError("a text-only prompt went through the embedding step")

    monkeypatch.setattr(vision_engine, "run_embeds_step", no_embeddings)
    prompts = [list(range(10, 40)), list(range(50, 61))]
    with load(tiny_bundle) as text_only:
        expected = text_only.generate(prompts, 8, stop_tokens=[]).tokens
    assert vision_engine.generate(prompts, 8, stop_tokens=[]).tokens == expected


def test_two_stage_bundle_with_images_equals_one_stage(vision_engine, tmp_path):
    """--stages 2 with images: the embedding step feeds stage 0's embeddings prefill graph (hidden_states in), whose
    hidden_states stage 1's ordinary graphs take. A ragged batch (one image, two images of different grids, none)
    gives the one-stage bundle's greedy tokens, and its logits within 1e-5 x max(1, max|logit|): the same ops, cut
    at a stage boundary, so float reassociation at most."""
    from llama4_deploy.build import build
    from llama4_deploy.runtime import load

    bundle = build("tiny-vision", out=tmp_path / "s2", stages=2, log=lambda _: None).bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    first, second = manifest["engine"]["stages"]
    assert first["embeddings"]["embed"] == "stage0.embed.onnx" and "embeddings" not in second
    assert manifest["engine"]["vision"]["prefill"] == first["embeddings"]["prefill"]
    assert first["embeddings"]["prefill"].startswith("stage0.embeds.")
    image = vision_engine.image_tokens.image
    prompts = [[5, image, 6, 7], [8, image, 9, 10, image, 11], [12, 13, 14]]
    pictures = [[_picture(112, 112, 21)], [_picture(56, 56, 22), _picture(56, 112, 23)], []]
    kwargs = dict(images=pictures, stop_tokens=[], return_logits=True)
    one = vision_engine.generate(prompts, 8, **kwargs)
    with load(bundle) as engine:
        assert len(engine.stages) == 2
        two = engine.generate(prompts, 8, **kwargs)
    assert two.tokens == one.tokens
    for got, want in zip(two.logits, one.logits):
        assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())
