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
    if source.get("kind") != "checkpoint":
        raise ValueError("the image reference needs the checkpoint a vision bundle was built from")
    kwargs = dict(dtype=torch.float32, attn_implementation="eager", use_safetensors=True)
    return Llama4ForConditionalGeneration.from_pretrained(str(source["path"]), **kwargs).eval()


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
