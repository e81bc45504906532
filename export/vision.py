"""Llama 4's vision tower and projector in deploy form, and its export to the bundle's vision engine.

The deploy-form module computes what transformers' `Llama4VisionModel` followed by `Llama4MultiModalProjector`
computes (`Llama4ForConditionalGeneration.get_image_features`, then `multi_modal_projector`), written for export:

    pixel_values [T, C, S, S]
      -> patches: the Unfold convolution as reshape + transpose + one MatMul   [T, P, D]   (P = (S/p)^2)
      -> + class embedding (appended last), + positional embedding, LayerNorm    [T, P+1, D]
      -> encoder layers: LayerNorm, attention with 2-D RoPE on interleaved pairs (real-valued: cos/sin tables
         precomputed from the reference's own `_compute_freqs_ci`), bidirectional; LayerNorm, MLP (GELU)
      -> LayerNorm, drop the class token, pixel shuffle (ratio r: static reshapes/transposes) [T, P*r^2, D/r^2]
      -> adapter MLP (fc1, GELU, fc2, GELU), projector (one MatMul to the text width)      [T, P*r^2, hidden]

Tiles T is the only dynamic dimension (a profile dimension, bounded by images per step x (max_patches + 1)).
Weights are stored in float32, unquantized at every precision: Meta's own FP8 release of Maverick keeps the
vision tower and projector in bf16 (its quantization config ignores `vision_model` and `multi_modal_projector`),
and the tower is under 1% of the model's bytes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from llama4_deploy.export.vision_shape import (  # noqa: F401 - the build and tests import these from here too
    IMAGE_TOKENS,
    PROJECTOR,
    PUBLISHED_PROJECTION,
    PUBLISHED_VISION,
    RANDOM_IMAGE_TOKENS,
    VISION_PREFIX,
    VisionConfigError,
    VisionShape,
    check_vision_shapes,
    image_processor_config,
    image_spec,
    image_token_ids,
    published_mismatches,
    random_image_token_ids,
    tiles_limit,
    write_image_tokenizer,
)


def read_vision_weights(checkpoint, shape: VisionShape) -> dict[str, torch.Tensor]:
    """The tower's and projector's tensors (float32), checked against the shapes the vision_config implies."""
    check_vision_shapes(checkpoint, shape)
    out = {}
    for name in shape.weight_shapes():
        tensor = checkpoint.full_tensor(name).to(torch.float32)
        if not bool(torch.isfinite(tensor).all()):
            raise VisionConfigError(f"checkpoint tensor {name} holds NaN or Inf values; the build refuses them")
        out[name] = tensor
    return out


def rope_tables(shape: VisionShape) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [P+1, head_dim/2] of the reference's 2-D RoPE (its own `_compute_freqs_ci`, taken apart)."""
    from types import SimpleNamespace

    from transformers.models.llama4.modeling_llama4 import Llama4VisionRotaryEmbedding

    config = SimpleNamespace(
        image_size=shape.image_size,
        patch_size=shape.patch_size,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_heads,
        rope_parameters={"rope_theta": shape.rope_theta},
    )
    freqs = Llama4VisionRotaryEmbedding._compute_freqs_ci(config)  # complex [P+1, 1, head_dim/2]
    return freqs.real[:, 0].float().contiguous(), freqs.imag[:, 0].float().contiguous()


class _Layer(nn.Module):
    def __init__(self, shape: VisionShape):
        super().__init__()
        d, i = shape.hidden_size, shape.intermediate_size
        self.input_layernorm = nn.LayerNorm(d)
        self.post_attention_layernorm = nn.LayerNorm(d)
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.o_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, i), nn.Linear(i, d)
        self.heads, self.head_dim = shape.num_heads, shape.head_dim

    def forward(self, x, cos, sin):  # x [T, L, D]; cos/sin [L, hd/2]
        tiles, length, width = x.shape
        h = self.input_layernorm(x)
        q = self.q_proj(h).reshape(tiles, length, self.heads, self.head_dim)
        k = self.k_proj(h).reshape(tiles, length, self.heads, self.head_dim)
        v = self.v_proj(h).reshape(tiles, length, self.heads, self.head_dim)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [T, heads, L, hd]
        scores = torch.matmul(q, k.transpose(2, 3)) * (self.head_dim**-0.5)
        attended = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(tiles, length, width)
        x = x + self.o_proj(attended)
        return x + self.fc2(nn.functional.gelu(self.fc1(self.post_attention_layernorm(x))))


def _rotate(x, cos, sin):
    """RoPE on interleaved pairs (2i, 2i+1), as the reference's complex product: x [T, L, heads, hd]."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).reshape(x.shape)


class DeployVision(nn.Module):
    """pixel_values [T, C, S, S] -> image features [T, tokens_per_tile, text hidden] (see the module docstring)."""

    def __init__(self, shape: VisionShape):
        super().__init__()
        self.shape = shape
        d = shape.hidden_size
        self.patch = nn.Linear(shape.num_channels * shape.patch_size**2, d, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(d))
        self.positional_embedding = nn.Parameter(torch.zeros(shape.patches_per_side**2 + 1, d))
        self.layernorm_pre, self.layernorm_post = nn.LayerNorm(d), nn.LayerNorm(d)
        self.layers = nn.ModuleList(_Layer(shape) for _ in range(shape.num_layers))
        self.adapter_fc1 = nn.Linear(shape.intermediate_size, shape.projector_input_dim, bias=False)
        self.adapter_fc2 = nn.Linear(shape.projector_output_dim, shape.projector_output_dim, bias=False)
        self.projector = nn.Linear(shape.vision_output_dim, shape.text_hidden_size, bias=False)
        cos, sin = rope_tables(shape)
        self.register_buffer("rope_cos", cos)
        self.register_buffer("rope_sin", sin)

    def load(self, tensors: dict[str, torch.Tensor]) -> DeployVision:
        v = VISION_PREFIX
        own = {
            "patch.weight": f"{v}patch_embedding.linear.weight",
            "class_embedding": f"{v}class_embedding",
            "positional_embedding": f"{v}positional_embedding_vlm",
            "layernorm_pre.weight": f"{v}layernorm_pre.weight",
            "layernorm_pre.bias": f"{v}layernorm_pre.bias",
            "layernorm_post.weight": f"{v}layernorm_post.weight",
            "layernorm_post.bias": f"{v}layernorm_post.bias",
            "adapter_fc1.weight": f"{v}vision_adapter.mlp.fc1.weight",
            "adapter_fc2.weight": f"{v}vision_adapter.mlp.fc2.weight",
            "projector.weight": PROJECTOR,
        }
        for layer in range(self.shape.num_layers):
            src = f"{v}model.layers.{layer}."
            for part in ("weight", "bias"):
                for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                    own[f"layers.{layer}.{proj}.{part}"] = f"{src}self_attn.{proj}.{part}"
                for fc in ("fc1", "fc2"):
                    own[f"layers.{layer}.{fc}.{part}"] = f"{src}mlp.{fc}.{part}"
                for norm in ("input_layernorm", "post_attention_layernorm"):
                    own[f"layers.{layer}.{norm}.{part}"] = f"{src}{norm}.{part}"
        state = {mine: tensors[theirs] for mine, theirs in own.items()}
        state["rope_cos"], state["rope_sin"] = self.rope_cos, self.rope_sin
        self.load_state_dict(state, strict=True)
        return self.eval()

    def forward(self, pixel_values):
        s = self.shape
        tiles = pixel_values.shape[0]
        grid, p, c = s.patches_per_side, s.patch_size, s.num_channels
        # Unfold(kernel p, stride p): features ordered (channel, row, col) within a patch, patches row-major
        patches = pixel_values.reshape(tiles, c, grid, p, grid, p).permute(0, 2, 4, 1, 3, 5)
        x = self.patch(patches.reshape(tiles, grid * grid, c * p * p))
        cls = self.class_embedding.reshape(1, 1, -1).expand(tiles, 1, s.hidden_size)
        x = torch.cat([x, cls], dim=1) + self.positional_embedding
        x = self.layernorm_pre(x)
        for layer in self.layers:
            x = layer(x, self.rope_cos, self.rope_sin)
        x = self.layernorm_post(x)[:, :-1, :]
        x = _pixel_shuffle(x, grid, s.pixel_shuffle_ratio)
        x = nn.functional.gelu(self.adapter_fc2(nn.functional.gelu(self.adapter_fc1(x))))
        return self.projector(x)


def _pixel_shuffle(x, grid: int, ratio: float):
    """The reference's `pixel_shuffle` with every size static (grid, ratio from the config)."""
    tiles, _, channels = x.shape
    narrow, up = int(grid * ratio), int(channels / ratio)
    x = x.reshape(tiles, grid, narrow, up).permute(0, 2, 1, 3)
    x = x.reshape(tiles, narrow, narrow, int(channels / (ratio * ratio))).permute(0, 2, 1, 3)
    return x.reshape(tiles, narrow * narrow, int(channels / (ratio * ratio)))


def export_vision(module: DeployVision, path: Path, max_tiles: int) -> None:
    """The vision engine's ONNX graph (`pixel_values` [tiles, C, S, S] -> `image_features`), weights in
    `<name>.data` beside it; tiles is dynamic, 1 .. max_tiles."""
    import onnx_ir as ir

    s = module.shape
    example = torch.zeros(2 if max_tiles > 2 else max_tiles, s.num_channels, s.image_size, s.image_size)
    tiles = torch.export.Dim("tiles", min=1, max=max(max_tiles, 2))
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            opset_version=21,
            input_names=["pixel_values"],
            output_names=["image_features"],
            dynamic_shapes=({0: tiles},),
            optimize=True,
            verbose=False,
        )
    model = program.model
    model.graph.inputs[0].shape = ir.Shape(["tiles", s.num_channels, s.image_size, s.image_size])
    model.graph.outputs[0].shape = ir.Shape(["tiles", s.tokens_per_tile, s.text_hidden_size])
    ir.save(model, path, external_data=f"{path.name}.data")


def reference_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """transformers' image features for the same pixel values: `get_image_features`, then the projector."""
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixel_values, return_dict=True).last_hidden_state
        return model.multi_modal_projector(features)
