"""A multimodal Llama 4 checkpoint the tests write themselves.

What `save_pretrained` writes for a real Llama 4: `Llama4ForConditionalGeneration` with random weights at reduced
widths, a tokenizer whose last ids are Llama 4's image special tokens, and `processor_config.json` /
`preprocessor_config.json` written by `Llama4Processor.save_pretrained` (in the reference subprocess,
tests/vision_reference.py, since the image processor needs torchvision).
"""

from __future__ import annotations

import json
from pathlib import Path

from llama4_deploy.export.vision_shape import RANDOM_IMAGE_TOKENS
from tests.vision_reference import run_reference

# the test checkpoints put the image tokens where the product's random multimodal model does: the last ids
IMAGE_TOKENS = RANDOM_IMAGE_TOKENS

# reduced widths: the published tower is hidden 1408, 34 layers, 16 heads, image 336, patch 14, projector 4096;
# intermediate_size must be 4 x hidden (the pixel shuffle's output width feeds the adapter's fc1)
TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=56,
    patch_size=14,
    pixel_shuffle_ratio=0.5,
    projector_input_dim=64,
    projector_output_dim=64,
    vision_output_dim=64,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)


def image_token_ids(vocab_size: int) -> dict[str, int]:
    """The ids of Llama 4's image special tokens: the vocabulary's last six."""
    return {token: vocab_size - len(IMAGE_TOKENS) + i for i, token in enumerate(IMAGE_TOKENS)}


def write_image_tokenizer(directory: Path, vocab_size: int):
    """tokenizer.json (+ tokenizer_config.json) over words `w0 ...` with the image special tokens as the last ids;
    returns transformers' fast tokenizer over it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = image_token_ids(vocab_size)
    vocab = {f"w{i}": i for i in range(vocab_size - len(IMAGE_TOKENS))} | specials
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.add_special_tokens(list(IMAGE_TOKENS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="w1", eos_token="w9", unk_token="w0")
    fast.save_pretrained(directory)
    return fast


def write_vision_checkpoint(
    directory: Path,
    seed: int = 0,
    vision: dict | None = None,
    max_patches: int = 4,
    text_config: dict | None = None,
) -> Path:
    """A multimodal checkpoint dir: weights and config by `Llama4ForConditionalGeneration.save_pretrained`, the
    tokenizer with Llama 4's image tokens, and `Llama4Processor.save_pretrained`'s processor files."""
    import torch
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    from llama4_deploy.export.reference import random_model
    from tests.conftest import tiny_config

    text = random_model(text_config or tiny_config(), seed, 40.0, 25.0)
    vision = dict(vision or TINY_VISION)
    ids = image_token_ids(text.config.vocab_size)
    torch.manual_seed(seed)
    config = Llama4Config(
        text_config=text.config.to_dict(),
        vision_config=vision,
        boi_token_index=ids["<|image_start|>"],
        eoi_token_index=ids["<|image_end|>"],
        image_token_index=ids["<|patch|>"],
    )
    full = Llama4ForConditionalGeneration(config)
    full.language_model.load_state_dict(text.state_dict())
    _peak_projector(full, seed)
    full.save_pretrained(directory)
    write_image_tokenizer(directory, text.config.vocab_size)
    job = {
        "op": "save",
        "directory": str(directory),
        "tokenizer": str(directory),
        "tile_size": vision["image_size"],
        "max_patches": max_patches,
        "patch_size": vision["patch_size"],
        "pixel_shuffle_ratio": vision["pixel_shuffle_ratio"],
    }
    run_reference([job], directory.parent / f".{directory.name}-reference")
    return directory


def _peak_projector(model, seed: int) -> None:
    """Scale the projector so image features are as large as token embeddings: with the default init they are
    ~100x smaller and the image would barely move the logits, so a wrong scatter could pass verification."""
    import torch

    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed + 1)
        weight = model.multi_modal_projector.linear_1.weight
        weight.copy_(torch.randn(weight.shape, generator=generator) / weight.shape[1] ** 0.5)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
