"""The numerical reference: transformers' Llama4ForCausalLM, built from a bundle's source.

A source is either a checkpoint directory or a recipe's random-weights description (a
Llama4TextConfig, a seed, and gains that make the random model's decisions well separated).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import Llama4ForCausalLM, Llama4ForConditionalGeneration, Llama4TextConfig

from llama4_deploy.export.checkpoint import Checkpoint


def random_model(config: dict[str, Any], seed: int, logit_gain: float = 1.0, router_gain: float = 1.0):
    """A seeded random Llama4ForCausalLM in fp32.

    transformers initializes weights with std 0.02, which leaves logits and router logits
    within a few hundredths of each other: greedy picks and expert choices would then flip on
    rounding noise. `logit_gain` and `router_gain` scale lm_head and every router so that top
    choices are separated by far more than fp32 error (peaked, no near-ties).
    """
    torch.manual_seed(seed)
    cfg = Llama4TextConfig(**config)
    cfg._attn_implementation = "eager"
    model = Llama4ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_gain)
        for layer in model.model.layers:
            if hasattr(layer.feed_forward, "router"):
                layer.feed_forward.router.weight.mul_(router_gain)
    return model


def checkpoint_model(path: str | Path):
    """Llama4ForCausalLM from a checkpoint dir; multimodal checkpoints give their language model."""
    config = json.loads((Path(path) / "config.json").read_text())
    text = config.get("text_config", config) if config.get("model_type") == "llama4" else config
    if "quantization_config" in config or "quantization_config" in text:
        return dequantized_model(path)
    kwargs = dict(dtype=torch.float32, attn_implementation="eager", use_safetensors=True)
    if config.get("model_type") == "llama4":
        # text-only calls into Llama4ForConditionalGeneration raise; its language_model is the reference
        return Llama4ForConditionalGeneration.from_pretrained(str(path), **kwargs).language_model.eval()
    return Llama4ForCausalLM.from_pretrained(str(path), **kwargs).eval()


def dequantized_model(path: str | Path):
    """Llama4ForCausalLM in fp32 holding a pre-quantized (compressed-tensors FP8) checkpoint's weights
    dequantized (q * weight_scale, experts stacked): transformers' own model, loaded through our reader
    (transformers would need the compressed-tensors package and dequantizes to bf16)."""
    checkpoint = Checkpoint(path)
    text = dict(checkpoint.config.get("text_config", checkpoint.config) if checkpoint.prefix else checkpoint.config)
    text.pop("quantization_config", None)
    cfg = Llama4TextConfig.from_dict(text)
    cfg._attn_implementation = "eager"
    model = Llama4ForCausalLM(cfg)
    state = {}
    for name in model.state_dict():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        state[name] = checkpoint.tensor(name).to(torch.float32)
    model.load_state_dict(state, strict=not cfg.tie_word_embeddings)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def reference_model(source: dict[str, Any]):
    """Rebuild the reference from a manifest's `source` record."""
    if source["kind"] == "checkpoint":
        return checkpoint_model(source["path"])
    random = source["random"]
    return random_model(random["config"], random["seed"], random["logit_gain"], random["router_gain"])


def reference_logits(model, ids: list[int]):
    """Logits [len(ids), vocab] of one unpadded sequence, no cache (the simplest correct path)."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().numpy()


def multimodal_reference(source: dict):
    """Llama4ForConditionalGeneration (fp32, eager attention) from a bundle's source record: the image reference."""
    if source.get("kind") == "random":
        return random_multimodal(source["random"])
    if source.get("kind") != "checkpoint":
        raise ValueError("the image reference needs the checkpoint or random weights a vision bundle was built from")
    config = json.loads((Path(source["path"]) / "config.json").read_text())
    if "quantization_config" in config or "quantization_config" in config.get("text_config", {}):
        return dequantized_multimodal(source["path"])
    kwargs = dict(dtype=torch.float32, attn_implementation="eager", use_safetensors=True)
    return Llama4ForConditionalGeneration.from_pretrained(str(source["path"]), **kwargs).eval()


def dequantized_multimodal(path: str | Path):
    """Llama4ForConditionalGeneration in fp32 from a pre-quantized (compressed-tensors FP8) multimodal checkpoint:
    its language model holds `dequantized_model`'s weights, its vision tower and projector the checkpoint's as stored
    (Meta's FP8 release leaves them unquantized), read through our reader as `dequantized_model` does."""
    from transformers import Llama4Config

    config = json.loads((Path(path) / "config.json").read_text())
    config.pop("quantization_config", None)
    config.get("text_config", {}).pop("quantization_config", None)
    model = Llama4ForConditionalGeneration(Llama4Config.from_dict(config))
    model.language_model.load_state_dict(dequantized_model(path).state_dict())
    checkpoint = Checkpoint(path)
    with torch.no_grad():
        for part in ("vision_model", "multi_modal_projector"):
            for name, tensor in getattr(model, part).state_dict().items():
                tensor.copy_(checkpoint.full_tensor(f"{part}.{name}").to(torch.float32))
    return model.eval()


def multimodal_logits(model, input_ids, pixel_values, prompt_length: int | None = None):
    """Llama4ForConditionalGeneration's logits [T, V] for one sequence with images: its forward's own steps
    (input embeddings, `get_image_features`, the projector, `get_placeholder_mask`, masked_scatter, the language
    model). transformers 5.24's `forward` computes exactly these, then fails building its output object
    ('MoeCausalLMOutputWithPast' has no attribute 'image_outputs'), so the steps are called here. `prompt_length`:
    only <|patch|> positions before it take image features, as in generation, where images enter with the prompt
    and a generated <|patch|> id is an ordinary token."""
    with torch.no_grad():
        ids = torch.as_tensor(input_ids).reshape(1, -1)
        embeds = model.get_input_embeddings()(ids)
        if pixel_values is not None:
            features = model.get_image_features(pixel_values=torch.as_tensor(pixel_values), return_dict=True)
            flat = features.last_hidden_state.reshape(-1, features.last_hidden_state.shape[-1])
            projected = model.multi_modal_projector(flat).to(embeds.dtype)
            if prompt_length is None:
                mask = model.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=projected)
            else:
                placed = (ids == model.config.image_token_id) & (torch.arange(ids.shape[1]) < prompt_length)
                mask = placed.unsqueeze(-1).expand_as(embeds)
            embeds = embeds.masked_scatter(mask, projected)
        return model.language_model(inputs_embeds=embeds).logits[0].float().numpy()


def random_multimodal(random: dict[str, Any]):
    """A seeded random Llama4ForConditionalGeneration: the text model is `random_model`'s (the same weights the
    text reference rebuilds), the vision tower and projector drawn after it from the same seed. The image tokens
    are the vocabulary's last six ids (export/vision.py RANDOM_IMAGE_TOKENS). The projector is drawn at unit gain
    (std 1/sqrt(fan-in)): at transformers' std 0.02 image features are ~100x smaller than token embeddings and
    would barely move the logits, so a wrong scatter could pass verification."""
    from transformers import Llama4Config

    from llama4_deploy.export.vision import random_image_token_ids

    text = random_model(random["config"], random["seed"], random["logit_gain"], random["router_gain"])
    ids = random_image_token_ids(text.config.vocab_size)
    torch.manual_seed(random["seed"])
    config = Llama4Config(
        text_config=text.config.to_dict(),
        vision_config=dict(random["vision_config"]),
        boi_token_index=ids["<|image_start|>"],
        eoi_token_index=ids["<|image_end|>"],
        image_token_index=ids["<|patch|>"],
    )
    model = Llama4ForConditionalGeneration(config)
    model.language_model.load_state_dict(text.state_dict())
    with torch.no_grad():
        generator = torch.Generator().manual_seed(random["seed"] + 1)
        weight = model.multi_modal_projector.linear_1.weight
        weight.copy_(torch.randn(weight.shape, generator=generator) / weight.shape[1] ** 0.5)
    return model.eval()


def write_random_multimodal(random: dict[str, Any], directory: Path) -> None:
    """`random_multimodal` as a checkpoint: its weights and config by save_pretrained, a word-level tokenizer.json
    with the image tokens as its last ids, and processor_config.json as transformers 5.24's Llama4Processor writes
    it (written here: the image processor class needs torchvision, which the build does not)."""
    from llama4_deploy.export.vision import random_image_token_ids, write_image_tokenizer

    model = random_multimodal(random)
    model.save_pretrained(directory)
    vocab = model.config.text_config.vocab_size
    write_image_tokenizer(directory / "tokenizer.json", vocab, random_image_token_ids(vocab))
    processor = random_processor_config(random)
    (directory / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")


def random_processor_config(random: dict[str, Any]) -> dict[str, Any]:
    """processor_config.json of a random multimodal model, as transformers 5.24's Llama4Processor.save_pretrained
    writes it for these settings (tests/test_vision.py compares the two)."""
    side = random["vision_config"]["image_size"]
    return {
        "fake_image_token": "<|image|>",
        "image_processor": {
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_processor_type": "Llama4ImageProcessor",
            "image_std": [0.5, 0.5, 0.5],
            "max_patches": random.get("max_patches", 16),
            "resample": 2,
            "rescale_factor": 1 / 255,
            "resize_to_max_canvas": False,
            "size": {"height": side, "width": side},
        },
        "image_token": "<|image|>",
        "patch_size": random["vision_config"]["patch_size"],
        "processor_class": "Llama4Processor",
    }
