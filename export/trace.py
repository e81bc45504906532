"""Trace each layer kind of the deploy-form model once into an ONNX template.

Tracing runs under FakeTensorMode: templates hold weights as initializers *without data*, named
by the deploy-form parameter names, and the link pass (graphs/link.py) stamps real weights per
layer. Tracing therefore costs the same for Maverick as for a toy, and the optimizer cannot fold
or deduplicate placeholder weights. Real constants (RoPE frequencies) are filled in afterwards. Dynamic dimensions: `batch`, `new` (tokens
this step) and, for global layers, `context` (cache slots). A chunked layer's cache has exactly
attention_chunk_size slots, so that dimension is static.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings

import numpy as np
import onnx_ir as ir
import onnxscript
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from llama4_deploy.export import modules
from llama4_deploy.export.shape import LayerKind, ModelShape
from llama4_deploy.graphs import ops

OPSET = 21
LAYER_INPUTS = ("hidden_states", "position_ids", "past_lengths", "past_key", "past_value")
LAYER_OUTPUTS = ("hidden_states_out", "present_key", "present_value")
# Example sizes for tracing; distinct from each other and from model dims so no dimension
# gets specialized to another by coincidence.
_EXAMPLE = {"batch": 3, "new": 5, "context": 13}


def _example_sizes(shape: ModelShape) -> dict[str, int]:
    taken = {shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.hidden_size, shape.attention_chunk_size}
    sizes, candidate = {}, 3
    for name in _EXAMPLE:
        while candidate in taken or candidate < _EXAMPLE[name]:
            candidate += 1
        sizes[name] = candidate
        taken.add(candidate)
    return sizes


def _export(build, dynamic_shapes, input_names, output_names, constants=None) -> ir.Model:
    """Trace `build()` -> (module, example args) with fake tensors; `constants` fills buffers."""
    ops.register_schemas()
    with FakeTensorMode():
        module, args = build()
    for noisy in ("torch.onnx", "onnx_ir", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module.eval(),
            args,
            dynamo=True,
            opset_version=OPSET,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_shapes=dynamic_shapes,
            custom_translation_table={torch.ops.llama4_deploy.moe.default: modules.moe_to_onnx},
            optimize=False,  # run below, once weights are data-less
            verbose=False,
        )
    model = program.model
    constants = constants or {}
    for name, value in model.graph.initializers.items():
        value.const_value = ir.tensor(constants[name], name=name) if name in constants else None
    onnxscript.optimizer.optimize(model)
    return model


def trace_layer(shape: ModelShape, kind: LayerKind) -> ir.Model:
    n = _example_sizes(shape)
    cache = shape.attention_chunk_size if kind.rope else n["context"]
    K, D = shape.num_kv_heads, shape.head_dim

    def build():
        args = (
            torch.zeros(n["batch"], n["new"], shape.hidden_size),
            torch.zeros(n["batch"], n["new"], dtype=torch.int64),
            torch.zeros(n["batch"], dtype=torch.int64),
            torch.zeros(n["batch"], K, cache, D),
            torch.zeros(n["batch"], K, cache, D),
        )
        return modules.DecoderLayer(shape, kind), args

    batch, new = torch.export.Dim("batch"), torch.export.Dim("new")
    cache_dims = {0: batch} if kind.rope else {0: batch, 2: torch.export.Dim("context")}
    dynamic = ({0: batch, 1: new}, {0: batch, 1: new}, {0: batch}, cache_dims, cache_dims)
    constants = {"rope_inv_freq": np.asarray(shape.rope_inv_freq(), dtype=np.float32)} if kind.rope else {}
    return _export(build, dynamic, LAYER_INPUTS, LAYER_OUTPUTS, constants)


def trace_embed(shape: ModelShape) -> ir.Model:
    n = _example_sizes(shape)
    dims = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("new")},)

    def build():
        return modules.Embed(shape), (torch.zeros(n["batch"], n["new"], dtype=torch.int64),)

    return _export(build, dims, ("input_ids",), ("hidden_states",))


def trace_head(shape: ModelShape) -> ir.Model:
    n = _example_sizes(shape)
    dims = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("new")},)

    def build():
        return modules.Head(shape), (torch.zeros(n["batch"], n["new"], shape.hidden_size),)

    return _export(build, dims, ("hidden_states",), ("logits",))


_TEMPLATES: dict[str, dict[str, ir.Model]] = {}


def trace_templates(shape: ModelShape) -> dict[str, ir.Model]:
    """Every template a model of this shape needs: embed, head, and one per layer kind present.

    Memoized per shape within the process (linking clones templates, never mutates them)."""
    key = json.dumps(shape.to_dict(), sort_keys=True)
    if key not in _TEMPLATES:
        templates = {"embed": trace_embed(shape), "head": trace_head(shape)}
        for kind in dict.fromkeys(shape.layer_kinds):
            templates[kind.name] = trace_layer(shape, kind)
        _TEMPLATES[key] = templates
    return _TEMPLATES[key]
