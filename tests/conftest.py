"""Fixtures are code: models come from a config and a seed, checkpoints from save_pretrained."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llama4_deploy.build.recipe import load_recipe


def tiny_config() -> dict:
    return dict(load_recipe("tiny").random.config)


def write_checkpoint(
    directory: Path,
    config: dict | None = None,
    seed: int = 0,
    multimodal: bool = False,
    max_shard_size: str | None = None,
    logit_gain: float = 40.0,
    router_gain: float = 25.0,
    tokenizer: bool = False,
) -> Path:
    """A Hugging Face checkpoint dir written by transformers itself (optionally sharded, multimodal)."""
    import torch
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    from llama4_deploy.export.reference import random_model

    text = random_model(config or tiny_config(), seed, logit_gain, router_gain)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    if multimodal:
        # intermediate_size is 4 x hidden_size: the pixel shuffle's output width (export/vision_shape.py checks it)
        widths = dict(hidden_size=32, intermediate_size=128, vision_output_dim=32, projector_input_dim=32)
        vision = dict(widths, projector_output_dim=32, num_hidden_layers=1, num_attention_heads=2, image_size=28)
        vision["patch_size"] = 14
        torch.manual_seed(seed)
        # the image tokens index the text vocabulary (the build refuses ids outside it): its last three ids
        vocab = text.config.vocab_size
        images = dict(boi_token_index=vocab - 3, eoi_token_index=vocab - 2, image_token_index=vocab - 1)
        full = Llama4ForConditionalGeneration(
            Llama4Config(text_config=text.config.to_dict(), vision_config=vision, **images)
        )
        full.language_model.load_state_dict(text.state_dict())
        full.save_pretrained(directory, **kwargs)
    else:
        text.save_pretrained(directory, **kwargs)
    if tokenizer:
        write_tokenizer(directory / "tokenizer.json", text.config.vocab_size)
    return directory


def recipe_checkpoint(name: str, directory: Path) -> Path:
    """A recipe's seeded random weights written as a checkpoint: what a build of the recipe reads."""
    from llama4_deploy.build.recipe import load_recipe
    from llama4_deploy.export.reference import random_model

    weights = load_recipe(name).random
    random_model(weights.config, weights.seed, weights.logit_gain, weights.router_gain).save_pretrained(directory)
    return directory


def quiet_build(recipe: str | None, out: Path, **options) -> Path:
    """build() without its progress log; the bundle's directory."""
    from llama4_deploy.build import build

    return build(recipe, out=out, log=lambda _: None, **options).bundle


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer over `w0 ... w{n-1}` built with the tokenizers library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.save(str(path))
    # tokenizer_config.json's chat template, in Llama 4's structure but spelled in this vocabulary's
    # words (w1 begins the text, w7 ... w8 frame a header, w9 ends a turn), so it encodes to real ids
    template = (
        "{{ bos_token }} {% for m in messages %}w7 {{ m['role'] }} w8 {{ m['content'] | trim }} w9 "
        "{% endfor %}{% if add_generation_prompt %}w7 assistant w8{% endif %}"
    )
    config = {"chat_template": template, "bos_token": "w1", "eos_token": "w9"}
    (path.parent / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    from llama4_deploy.build import build

    return build("tiny", out=tmp_path_factory.mktemp("bundles") / "tiny", log=lambda _: None).bundle


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory) -> Path:
    """Sharded multimodal checkpoint (text model under `language_model.`) with a tokenizer."""
    return write_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "mm", seed=7, multimodal=True, max_shard_size="200KB", tokenizer=True
    )


@pytest.fixture(scope="session")
def checkpoint_bundle(tmp_path_factory, checkpoint_dir) -> Path:
    from llama4_deploy.build import build

    out = tmp_path_factory.mktemp("bundles") / "from-checkpoint"
    # its vision tower is a stub (no processor files, no image tokens): the text model is what these tests build
    return build(checkpoint=checkpoint_dir, out=out, vision=False, log=lambda _: None).bundle


def manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def assert_verify_matches_whole_model_reference(bundle: Path, monkeypatch) -> None:
    """verify's report (layer-by-layer reference, export/layerwise.py) equals the one it gave with transformers'
    whole model as the reference (the way verify ran before): same rows, PASS, figures within 1e-6 (both
    references compute the same fp32 logits, so the figures are the same engine-vs-reference differences)."""
    from llama4_deploy.export import layerwise
    from llama4_deploy.export.reference import reference_logits, reference_model
    from llama4_deploy.quality import verify as verify_module

    monkeypatch.setattr(verify_module, "_perplexity", lambda *args: None)  # unrelated to the reference
    layer_by_layer = verify_module.verify(str(bundle), log=lambda _: None)
    source = manifest(bundle)["source"]

    def whole_model(weights, passes, logits=True, after_layer=None, log=None):
        assert all(p.prepare is None for p in passes), "an fp32 bundle is verified against the fp32 model"
        model = reference_model(source)
        return [[reference_logits(model, ids) for ids in p.ids] for p in passes]

    monkeypatch.setattr(layerwise, "run_layer_by_layer", whole_model)
    whole = verify_module.verify(str(bundle), log=lambda _: None)
    assert layer_by_layer.ok and whole.ok, layer_by_layer.table() + "\n" + whole.table()
    assert len(layer_by_layer.rows) == len(whole.rows) == 5
    for a, b in zip(layer_by_layer.rows, whole.rows):
        assert (a.path, a.prompt, a.tokens, a.greedy_agree, a.greedy_total) == (
            b.path,
            b.prompt,
            b.tokens,
            b.greedy_agree,
            b.greedy_total,
        )
        assert abs(a.comparison.value - b.comparison.value) <= 1e-6
        assert abs(a.comparison.tolerance - b.comparison.tolerance) <= 1e-6 * b.comparison.tolerance


def opened_engines(bundles: dict):
    """A module fixture's body: every bundle of `bundles` loaded (2 threads) under the same key, closed after."""
    from llama4_deploy.runtime import load

    opened = {key: load(bundle, threads=2) for key, bundle in bundles.items()}
    yield opened
    for engine in opened.values():
        engine.close()


@pytest.fixture(scope="session")
def vision_bundle(tmp_path_factory):
    """The tiny-vision recipe's bundle: its seeded random weights written as a multimodal checkpoint by the build."""
    from llama4_deploy.build import build

    return build("tiny-vision", out=tmp_path_factory.mktemp("bundles") / "tiny-vision", log=lambda _: None).bundle


@pytest.fixture(scope="session")
def vision_engine(vision_bundle):
    from llama4_deploy.runtime import load

    with load(vision_bundle) as engine:
        yield engine


@pytest.fixture(scope="session")
def multimodal_model(vision_bundle):
    from llama4_deploy.export.reference import multimodal_reference

    return multimodal_reference(json.loads((vision_bundle / "manifest.json").read_text())["source"])


def fails_once(real, message: str):
    """`real`, except that its first call raises RuntimeError(message): a fault injected once."""
    calls = []

    def wrapper(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError(message)
        return real(*args)

    return wrapper


def ranked_samples(engine, prompt, count, max_tokens, seed, **controls):
    """The `count` samples `generate` draws for `prompt` with seeds seed + j, each with its cumulative
    log-probability (the log-softmax, in float64, of the logits each token was sampled from), best first (vLLM's
    best_of ranking; ties keep sample order)."""
    scored = []
    for j in range(count):
        done = engine.generate([prompt], max_tokens, seed=seed + j, stop_tokens=[], return_logits=True, **controls)
        tokens, logits = done.tokens[0], done.logits[0].astype(np.float64)  # [steps, V]
        logprobs = logits - logits.max(-1, keepdims=True)
        logprobs -= np.log(np.exp(logprobs).sum(-1, keepdims=True))
        scored.append((float(logprobs[np.arange(len(tokens)), tokens].sum()), j, tokens))
    return sorted(scored, key=lambda s: -s[0])
