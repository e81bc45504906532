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

The graph is built as the text model's is: three templates traced once each with placeholder weights (`embed`, one
encoder layer, `head`), then linked (graphs/link.py) with the layer template stamped once per encoder layer with that
layer's weights (`layers.<i>.q_proj.weight`, nodes under `/layers.<i>/`), so a 34-layer tower costs one layer's trace.
Tiles T is the only dynamic dimension (a profile dimension, bounded by images per step x (max_patches + 1)).
Weights are stored in float32, unquantized at every precision: Meta's own FP8 release of Maverick keeps the
vision tower and projector in bf16 (its quantization config ignores `vision_model` and `multi_modal_projector`),
and the tower is under 1% of the model's bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
        # the 2-D RoPE tables [L, hd/2]: constants of the layer template, the same in every layer (not weights)
        length = shape.patches_per_side**2 + 1
        self.register_buffer("rope_cos", torch.zeros(length, shape.head_dim // 2), persistent=False)
        self.register_buffer("rope_sin", torch.zeros(length, shape.head_dim // 2), persistent=False)

    def forward(self, x):  # x [T, L, D]
        cos, sin = self.rope_cos, self.rope_sin
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


class _Embed(nn.Module):
    """pixel_values [T, C, S, S] -> hidden states [T, P+1, D]: patches, class token, positions, LayerNorm."""

    def __init__(self, shape: VisionShape):
        super().__init__()
        self.shape = shape
        d = shape.hidden_size
        self.patch = nn.Linear(shape.num_channels * shape.patch_size**2, d, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(d))
        self.positional_embedding = nn.Parameter(torch.zeros(shape.patches_per_side**2 + 1, d))
        self.layernorm_pre = nn.LayerNorm(d)

    def forward(self, pixel_values):
        s = self.shape
        tiles = pixel_values.shape[0]
        grid, p, c = s.patches_per_side, s.patch_size, s.num_channels
        # Unfold(kernel p, stride p): features ordered (channel, row, col) within a patch, patches row-major
        patches = pixel_values.reshape(tiles, c, grid, p, grid, p).permute(0, 2, 4, 1, 3, 5)
        x = self.patch(patches.reshape(tiles, grid * grid, c * p * p))
        cls = self.class_embedding.reshape(1, 1, -1).expand(tiles, 1, s.hidden_size)
        x = torch.cat([x, cls], dim=1) + self.positional_embedding
        return self.layernorm_pre(x)


class _Head(nn.Module):
    """hidden states [T, P+1, D] -> image features [T, tokens_per_tile, text hidden]: LayerNorm, the class token
    dropped, pixel shuffle, adapter MLP, projector."""

    def __init__(self, shape: VisionShape):
        super().__init__()
        self.shape = shape
        self.layernorm_post = nn.LayerNorm(shape.hidden_size)
        self.adapter_fc1 = nn.Linear(shape.intermediate_size, shape.projector_input_dim, bias=False)
        self.adapter_fc2 = nn.Linear(shape.projector_output_dim, shape.projector_output_dim, bias=False)
        self.projector = nn.Linear(shape.vision_output_dim, shape.text_hidden_size, bias=False)

    def forward(self, x):
        x = self.layernorm_post(x)[:, :-1, :]
        x = _pixel_shuffle(x, self.shape.patches_per_side, self.shape.pixel_shuffle_ratio)
        x = nn.functional.gelu(self.adapter_fc2(nn.functional.gelu(self.adapter_fc1(x))))
        return self.projector(x)


class DeployVision(nn.Module):
    """pixel_values [T, C, S, S] -> image features [T, tokens_per_tile, text hidden] (see the module docstring):
    embed, the encoder layers, head; each part is traced once into an ONNX template and the graph is linked from
    them (`export_vision`), as the text layers are."""

    def __init__(self, shape: VisionShape):
        super().__init__()
        self.shape = shape
        self.embed = _Embed(shape)
        self.layers = nn.ModuleList(_Layer(shape) for _ in range(shape.num_layers))
        self.head = _Head(shape)
        cos, sin = rope_tables(shape)
        for layer in self.layers:
            layer.rope_cos.copy_(cos)
            layer.rope_sin.copy_(sin)

    def load(self, tensors: dict[str, torch.Tensor]) -> DeployVision:
        v = VISION_PREFIX
        own = {
            "embed.patch.weight": f"{v}patch_embedding.linear.weight",
            "embed.class_embedding": f"{v}class_embedding",
            "embed.positional_embedding": f"{v}positional_embedding_vlm",
            "embed.layernorm_pre.weight": f"{v}layernorm_pre.weight",
            "embed.layernorm_pre.bias": f"{v}layernorm_pre.bias",
            "head.layernorm_post.weight": f"{v}layernorm_post.weight",
            "head.layernorm_post.bias": f"{v}layernorm_post.bias",
            "head.adapter_fc1.weight": f"{v}vision_adapter.mlp.fc1.weight",
            "head.adapter_fc2.weight": f"{v}vision_adapter.mlp.fc2.weight",
            "head.projector.weight": PROJECTOR,
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
        self.load_state_dict({mine: tensors[theirs] for mine, theirs in own.items()}, strict=True)
        return self.eval()

    def forward(self, pixel_values):
        x = self.embed(pixel_values)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _pixel_shuffle(x, grid: int, ratio: float):
    """The reference's `pixel_shuffle` with every size static (grid, ratio from the config)."""
    tiles, _, channels = x.shape
    narrow, up = int(grid * ratio), int(channels / ratio)
    x = x.reshape(tiles, grid, narrow, up).permute(0, 2, 1, 3)
    x = x.reshape(tiles, narrow, narrow, int(channels / (ratio * ratio))).permute(0, 2, 1, 3)
    return x.reshape(tiles, narrow * narrow, int(channels / (ratio * ratio)))


_VISION_TEMPLATES: dict[VisionShape, dict[str, Any]] = {}


def trace_vision_templates(shape: VisionShape) -> dict[str, Any]:
    """The vision engine's three ONNX templates, each traced once with placeholder weights (export/trace.py's
    tracer, fake tensors): `vision.embed` (pixel_values -> hidden_states), `vision.layer` (hidden_states ->
    hidden_states_out, the RoPE tables as its constants) and `vision.head` (hidden_states -> image_features).
    Tiles is their dynamic dimension. Memoized per shape within the process, as the text templates are (linking
    clones templates, never mutates them)."""
    if shape not in _VISION_TEMPLATES:
        _VISION_TEMPLATES[shape] = _trace_vision_templates(shape)
    return _VISION_TEMPLATES[shape]


def _trace_vision_templates(shape: VisionShape) -> dict[str, Any]:
    from llama4_deploy.export.trace import trace_template

    side, width, length = shape.image_size, shape.hidden_size, shape.patches_per_side**2 + 1
    tiles = ({0: torch.export.Dim("tiles")},)
    cos, sin = rope_tables(shape)
    return {
        "vision.embed": trace_template(
            lambda: (_Embed(shape), (torch.zeros(2, shape.num_channels, side, side),)),
            tiles,
            ("pixel_values",),
            ("hidden_states",),
        ),
        "vision.layer": trace_template(
            lambda: (_Layer(shape), (torch.zeros(2, length, width),)),
            tiles,
            ("hidden_states",),
            ("hidden_states_out",),
            {"rope_cos": cos.numpy(), "rope_sin": sin.numpy()},
        ),
        "vision.head": trace_template(
            lambda: (_Head(shape), (torch.zeros(2, length, width),)), tiles, ("hidden_states",), ("image_features",)
        ),
    }


def link_vision(module: DeployVision, templates: dict[str, Any]):
    """The vision engine's graph: the embed template, the layer template stamped once per encoder layer with that
    layer's weights (`layers.<i>.*`), the head (graphs/link.py, as the text layers are linked)."""
    import onnx_ir as ir

    from llama4_deploy.graphs.link import Stamp, link

    def weights(part: nn.Module) -> dict[str, Any]:
        return {name: ir.tensor(t.detach().numpy().copy(), name=name) for name, t in part.state_dict().items()}

    s = module.shape
    pixels = ir.Value(
        name="pixel_values",
        type=ir.TensorType(ir.DataType.FLOAT),
        shape=ir.Shape(["tiles", s.num_channels, s.image_size, s.image_size]),
    )
    stamps = [Stamp("vision.embed", "embed", {"pixel_values": "pixel_values"}, weights(module.embed))]
    hidden = "embed.hidden_states"
    for index, layer in enumerate(module.layers):
        stamps.append(Stamp("vision.layer", f"layers.{index}", {"hidden_states": hidden}, weights(layer)))
        hidden = f"layers.{index}.hidden_states_out"
    stamps.append(Stamp("vision.head", "head", {"hidden_states": hidden}, weights(module.head)))
    model, _ = link(templates, [pixels], stamps, {"image_features": "head.image_features"})
    model.graph.outputs[0].shape = ir.Shape(["tiles", s.tokens_per_tile, s.text_hidden_size])
    return model


def export_vision(module: DeployVision, path: Path) -> None:
    """The vision engine's ONNX graph (`pixel_values` [tiles, C, S, S] -> `image_features`), weights in
    `<name>.data` beside it; tiles is a free dimension (the manifest and the profiles bound it): traced once per
    part (trace_vision_templates) and linked per layer (link_vision)."""
    import onnx_ir as ir

    model = link_vision(module, trace_vision_templates(module.shape))
    ir.save(model, path, external_data=f"{path.name}.data")


def reference_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """transformers' image features for the same pixel values: `get_image_features`, then the projector."""
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixel_values, return_dict=True).last_hidden_state
        return model.multi_modal_projector(features)
