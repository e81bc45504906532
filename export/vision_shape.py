"""Llama 4's vision tower as the build reads it from a config, without torch: its sizes (`VisionShape`), their checks
against each other and the published Scout/Maverick config, the tensors they imply, the image processor's settings,
the image tokens' ids. `plan` and the recipe loader use it; export/vision.py builds the deploy-form module from it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

VISION_PREFIX = "vision_model."
PROJECTOR = "multi_modal_projector.linear_1.weight"
IMAGE_TOKENS = (
    "<|image|>",
    "<|image_start|>",
    "<|image_end|>",
    "<|patch|>",
    "<|tile_x_separator|>",
    "<|tile_y_separator|>",
)
# the published Scout / Maverick vision config (recipes check a checkpoint against it, like the text config)
PUBLISHED_VISION = {
    "hidden_size": 1408,
    "num_hidden_layers": 34,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "pixel_shuffle_ratio": 0.5,
}
PUBLISHED_PROJECTION = 5120  # the projector's output: the text model's hidden size
# where a random multimodal model (recipe tiny-vision, the tests' checkpoints) puts the image tokens: the last ids
RANDOM_IMAGE_TOKENS = (
    "<|image_start|>",
    "<|image_end|>",
    "<|image|>",
    "<|patch|>",
    "<|tile_x_separator|>",
    "<|tile_y_separator|>",
)


def random_image_token_ids(vocab_size: int) -> dict[str, int]:
    return {token: vocab_size - len(RANDOM_IMAGE_TOKENS) + i for i, token in enumerate(RANDOM_IMAGE_TOKENS)}


def write_image_tokenizer(path: Path, vocab_size: int, specials: dict[str, int]) -> None:
    """A word-level tokenizer.json over `w0 ...` with the image special tokens at the given ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size) if i not in set(specials.values())} | specials
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.add_special_tokens(list(specials))
    tokenizer.save(str(path))


class VisionConfigError(ValueError):
    """A vision_config (or its weights) the build cannot take, in one sentence."""


@dataclasses.dataclass(frozen=True)
class VisionShape:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int
    pixel_shuffle_ratio: float
    projector_input_dim: int
    projector_output_dim: int
    vision_output_dim: int
    rope_theta: float
    text_hidden_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        return self.patches_per_side**2 // int(round(1.0 / self.pixel_shuffle_ratio**2))

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> VisionShape:
        vision = config.get("vision_config")
        text = config.get("text_config") or {}
        if not isinstance(vision, dict):
            raise VisionConfigError("config.json has no vision_config object")
        required = (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "image_size",
            "patch_size",
            "pixel_shuffle_ratio",
            "projector_input_dim",
            "projector_output_dim",
            "vision_output_dim",
        )
        for key in required:
            value = vision.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise VisionConfigError(f"vision_config.{key} is {value!r}; a positive number is required")
        rope = vision.get("rope_parameters") or {}
        shape = cls(
            hidden_size=int(vision["hidden_size"]),
            intermediate_size=int(vision["intermediate_size"]),
            num_layers=int(vision["num_hidden_layers"]),
            num_heads=int(vision["num_attention_heads"]),
            image_size=int(vision["image_size"]),
            patch_size=int(vision["patch_size"]),
            num_channels=int(vision.get("num_channels", 3)),
            pixel_shuffle_ratio=float(vision["pixel_shuffle_ratio"]),
            projector_input_dim=int(vision["projector_input_dim"]),
            projector_output_dim=int(vision["projector_output_dim"]),
            vision_output_dim=int(vision["vision_output_dim"]),
            rope_theta=float(rope.get("rope_theta", vision.get("rope_theta", 10000.0))),
            text_hidden_size=int(text.get("hidden_size", 0)),
        )
        shape.check()
        return shape

    def check(self) -> None:
        """The geometry the tower's reshapes need (the reference would fail or compute garbage otherwise)."""
        if self.hidden_size % self.num_heads or self.head_dim % 4:
            raise VisionConfigError(
                f"vision_config hidden_size {self.hidden_size} over {self.num_heads} heads must give a head_dim "
                "divisible by 4 (2-D RoPE rotates pairs on each axis)"
            )
        if self.image_size % self.patch_size:
            raise VisionConfigError(
                f"vision_config image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        shuffle = int(round(1.0 / self.pixel_shuffle_ratio))
        if abs(1.0 / self.pixel_shuffle_ratio - shuffle) > 1e-9 or self.patches_per_side % shuffle:
            raise VisionConfigError(
                f"vision_config pixel_shuffle_ratio {self.pixel_shuffle_ratio} must be 1/n with n dividing the "
                f"{self.patches_per_side} patches per side"
            )
        shuffled = self.hidden_size * shuffle * shuffle
        if self.intermediate_size != shuffled:
            raise VisionConfigError(
                f"vision_config intermediate_size {self.intermediate_size} must equal hidden_size x "
                f"{shuffle * shuffle} = {shuffled}: the pixel shuffle's output feeds the adapter's fc1"
            )
        if self.projector_input_dim != self.projector_output_dim:
            raise VisionConfigError(
                f"vision_config projector_input_dim {self.projector_input_dim} must equal projector_output_dim "
                f"{self.projector_output_dim} (the adapter's fc2 maps one to the other and back)"
            )
        if self.vision_output_dim != self.projector_output_dim:
            raise VisionConfigError(
                f"vision_config vision_output_dim {self.vision_output_dim} must equal projector_output_dim "
                f"{self.projector_output_dim}: the projector reads the adapter's output"
            )

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the tower and projector with the shape this config implies (checkpoint names)."""
        d, i, p, c = self.hidden_size, self.intermediate_size, self.patch_size, self.num_channels
        v = VISION_PREFIX
        shapes = {
            f"{v}patch_embedding.linear.weight": (d, c * p * p),
            f"{v}class_embedding": (d,),
            f"{v}positional_embedding_vlm": (self.patches_per_side**2 + 1, d),
            f"{v}layernorm_pre.weight": (d,),
            f"{v}layernorm_pre.bias": (d,),
            f"{v}layernorm_post.weight": (d,),
            f"{v}layernorm_post.bias": (d,),
            f"{v}vision_adapter.mlp.fc1.weight": (self.projector_input_dim, i),
            f"{v}vision_adapter.mlp.fc2.weight": (self.projector_output_dim, self.projector_output_dim),
            PROJECTOR: (self.text_hidden_size, self.vision_output_dim),
        }
        for layer in range(self.num_layers):
            prefix = f"{v}model.layers.{layer}."
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                shapes[f"{prefix}self_attn.{proj}.weight"] = (d, d)
                shapes[f"{prefix}self_attn.{proj}.bias"] = (d,)
            shapes[f"{prefix}mlp.fc1.weight"] = (i, d)
            shapes[f"{prefix}mlp.fc1.bias"] = (i,)
            shapes[f"{prefix}mlp.fc2.weight"] = (d, i)
            shapes[f"{prefix}mlp.fc2.bias"] = (d,)
            for norm in ("input_layernorm", "post_attention_layernorm"):
                shapes[f"{prefix}{norm}.weight"] = (d,)
                shapes[f"{prefix}{norm}.bias"] = (d,)
        return shapes


def published_mismatches(shape: VisionShape) -> list[str]:
    """Where a checkpoint's vision config differs from the published Scout/Maverick one ("key: got, published")."""
    got = dataclasses.asdict(shape)
    names = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads"}
    out = [
        f"vision_config.{key} {got[names.get(key, key)]} (published {value})"
        for key, value in PUBLISHED_VISION.items()
        if got[names.get(key, key)] != value
    ]
    if shape.text_hidden_size != PUBLISHED_PROJECTION:
        out.append(f"projector output {shape.text_hidden_size} (published {PUBLISHED_PROJECTION})")
    return out


def image_processor_config(directory: Path) -> dict[str, Any]:
    """The image processor's settings from `processor_config.json` (transformers 5 nests them under
    `image_processor`) or `preprocessor_config.json` (the file the published checkpoints carry)."""
    for name, nested in (("processor_config.json", True), ("preprocessor_config.json", False)):
        path = directory / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise VisionConfigError(f"{path} is not valid JSON ({err})") from None
        if nested:
            data = data.get("image_processor") if isinstance(data, dict) else None
            if data is None:
                continue
        if not isinstance(data, dict):
            raise VisionConfigError(f"{path} is not a JSON object")
        return data
    raise VisionConfigError(
        f"{directory} has no processor_config.json or preprocessor_config.json: the image preprocessing is unknown"
    )


def image_spec(directory: Path, shape: VisionShape) -> dict[str, Any]:
    """The manifest's image preprocessing record (runtime/images.py ImageSpec), checked against the vision config."""
    data = image_processor_config(directory)
    processor_type = data.get("image_processor_type", "Llama4ImageProcessor")
    if not str(processor_type).startswith("Llama4ImageProcessor"):
        raise VisionConfigError(f"the checkpoint's image processor is {processor_type}, not Llama4ImageProcessor")
    size = data.get("size") or {}
    side = size.get("height")
    if side != size.get("width") or side != shape.image_size:
        raise VisionConfigError(
            f"the image processor's size {size} must be square and equal vision_config.image_size {shape.image_size}"
        )
    for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
        if data.get(flag, True) is not True:
            raise VisionConfigError(f"the image processor sets {flag} {data[flag]!r}; only true is supported")
    if data.get("resample", 2) != 2:
        raise VisionConfigError(f"the image processor's resample is {data['resample']}; only bilinear (2) is supported")
    max_patches = data.get("max_patches", 16)
    if not isinstance(max_patches, int) or isinstance(max_patches, bool) or max_patches < 1:
        raise VisionConfigError(f"the image processor's max_patches is {max_patches!r}; a positive integer is needed")
    return {
        "tile_size": shape.image_size,
        "max_patches": max_patches,
        "patch_size": shape.patch_size,
        "pixel_shuffle_ratio": shape.pixel_shuffle_ratio,
        "image_mean": [float(v) for v in data.get("image_mean", [0.5, 0.5, 0.5])],
        "image_std": [float(v) for v in data.get("image_std", [0.5, 0.5, 0.5])],
        "rescale_factor": float(data.get("rescale_factor", 1 / 255)),
        "resize_to_max_canvas": bool(data.get("resize_to_max_canvas", False)),
    }


def image_token_ids(tokenizer_file: Path | None, config: dict[str, Any]) -> dict[str, int]:
    """The ids of Llama 4's image special tokens from tokenizer.json, checked against config.json's."""
    if tokenizer_file is None:
        raise VisionConfigError("a vision bundle needs the checkpoint's tokenizer.json (for the image tokens' ids)")
    data = json.loads(tokenizer_file.read_text())
    added = {t.get("content"): t.get("id") for t in data.get("added_tokens", []) if isinstance(t, dict)}
    vocab = (data.get("model") or {}).get("vocab") or {}
    ids = {}
    for token in IMAGE_TOKENS:
        token_id = added.get(token, vocab.get(token) if isinstance(vocab, dict) else None)
        if not isinstance(token_id, int):
            raise VisionConfigError(f"tokenizer.json has no {token} token, which image prompts need")
        ids[token] = token_id
    patch = config.get("image_token_index", config.get("image_token_id"))
    if patch is not None and patch != ids["<|patch|>"]:
        raise VisionConfigError(
            f"config.json's image_token_index {patch} is not tokenizer.json's <|patch|> id {ids['<|patch|>']}"
        )
    return ids


def tiles_limit(images_per_step: int, max_patches: int) -> int:
    return max(1, images_per_step) * (max_patches + (1 if max_patches > 1 else 0))


def check_vision_shapes(checkpoint, shape: VisionShape) -> None:
    """Every tensor of the tower and projector the vision_config implies is in the checkpoint with that shape."""
    for name, implied in shape.weight_shapes().items():
        if not checkpoint.has_full(name):
            raise VisionConfigError(f"tensor {name} is missing from the checkpoint (its vision_config implies it)")
        got = checkpoint.full_shape(name)
        if got != implied:
            raise VisionConfigError(
                f"tensor {name} has shape {list(got)}, but the checkpoint's vision_config implies {list(implied)}"
            )
