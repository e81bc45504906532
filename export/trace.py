"""Trace each layer kind of the deploy-form model once into an ONNX template.

Tracing runs under FakeTensorMode: templates hold weights as initializers *without data*, named
by the deploy-form parameter names, and the link pass (graphs/link.py) stamps real weights per
layer. Tracing therefore costs the same for Maverick as for a toy, and the optimizer cannot fold
or deduplicate placeholder weights. Real constants (RoPE frequencies) are filled in afterwards. Dynamic
dimensions: `batch`, `new` (tokens this step), `context` (a global layer's cache slots) and `ring` (a chunked
layer's cache slots: the runtime sizes rings by the filled context, never beyond attention_chunk_size).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxscript
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.onnx._internal.exporter import _core, _dynamic_shapes, _registration

from llama4_deploy.export import modules
from llama4_deploy.export.shape import LayerKind, ModelShape
from llama4_deploy.graphs import ops

OPSET = 21
LAYER_OUTPUTS = ("hidden_states_out", "present_key", "present_value")
# Example sizes for tracing; distinct from each other and from model dims so no dimension
# gets specialized to another by coincidence.
_EXAMPLE = {"batch": 3, "new": 5, "context": 13, "ring": 7}


def _example_sizes(shape: ModelShape) -> dict[str, int]:
    taken = {shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.hidden_size, shape.attention_chunk_size}
    sizes = {}
    for name, candidate in _EXAMPLE.items():
        while candidate in taken:
            candidate += 1
        sizes[name] = candidate
        taken.add(candidate)
    return sizes


_REGISTRY = None  # torchlib's aten -> ONNX functions and the project's two ops, built once per process


def _registry():
    """What torch.onnx.export(dynamo=True, opset_version=OPSET, custom_translation_table=...) builds on every call
    (torch 2.13, torch/onnx/_internal/exporter/_compat.py): torchlib's registry plus the custom translations,
    about a tenth of each template's trace. The exporter only reads it."""
    global _REGISTRY
    if _REGISTRY is None:
        registry = _registration.ONNXRegistry.from_torchlib(opset_version=OPSET)
        for torch_op, onnx_op in {
            torch.ops.llama4_deploy.moe.default: modules.moe_to_onnx,
            torch.ops.llama4_deploy.attention.default: modules.attention_to_onnx,
        }.items():
            registry.register_op(torch_op, onnx_op, is_complex=False)
        _REGISTRY = registry
    return _REGISTRY


def _onnx_export(module, args, dynamic_shapes, input_names, output_names):
    """torch.onnx.export(module, args, dynamo=True, opset_version=OPSET, dynamic_shapes=..., optimize=False,
    verbose=False, custom_translation_table=the project's ops) as torch 2.13's export_compat runs it, with the
    registry built once (_registry) instead of per call; the optimizer runs later, once weights are data-less."""
    export_dims, rename_axes = _dynamic_shapes.convert_str_to_export_dim(dynamic_shapes)
    program = _core.export(
        module,
        args,
        None,
        registry=_registry(),
        dynamic_shapes=export_dims,
        input_names=list(input_names),
        output_names=list(output_names),
        profile=False,
        report=False,
        verify=False,
        dump_exported_program=False,
        artifacts_dir=".",
        verbose=False,
        optimize=False,
        opset_version=OPSET,
    )
    if rename_axes:
        program._rename_dynamic_axes(dynamic_shapes)
    return program


def trace_template(build, dynamic_shapes, input_names, output_names, constants=None) -> ir.Model:
    """Trace `build()` -> (module, example args) with fake tensors; `constants` fills buffers."""
    ops.register_schemas()
    with FakeTensorMode():
        module, args = build()
    for noisy in ("torch.onnx", "onnx_ir", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = _onnx_export(module.eval(), args, dynamic_shapes, input_names, output_names)
    model = program.model
    constants = constants or {}
    for name, value in model.graph.initializers.items():
        value.const_value = ir.tensor(constants[name], name=name) if name in constants else None
    onnxscript.optimizer.optimize(model)
    return model


def _layer_example(shape: ModelShape, kind: LayerKind, n: dict[str, int]) -> dict[str, torch.Tensor]:
    """Example tensor for every layer-template input, by name."""
    B, T, K, D = n["batch"], n["new"], shape.num_kv_heads, shape.head_dim
    cache = n["ring"] if kind.rope else n["context"]
    return {
        "hidden_states": torch.zeros(B, T, shape.hidden_size),
        "chunked_cache_mask": torch.ones(B, 1, 1, T, cache, dtype=torch.bool),
        "global_cache_mask": torch.ones(B, 1, 1, T, cache, dtype=torch.bool),
        "chunked_new_mask": torch.ones(B, 1, 1, T, T, dtype=torch.bool),
        "global_new_mask": torch.ones(B, 1, 1, T, T, dtype=torch.bool),
        "rope_cos": torch.ones(B, T, 1, D),
        "rope_sin": torch.zeros(B, T, 1, D),
        "temperature": torch.ones(B, T, 1, 1),
        "token_valid": torch.ones(B * T, dtype=torch.bool),
        "past_key": torch.zeros(B, K, cache, D),
        "past_value": torch.zeros(B, K, cache, D),
    }


def _layer_dims(kind: LayerKind, batch, new, context, ring) -> dict[str, dict[int, object]]:
    cache = {0: batch, 2: ring if kind.rope else context}
    return {
        "hidden_states": {0: batch, 1: new},
        "chunked_cache_mask": {0: batch, 3: new, 4: ring},
        "global_cache_mask": {0: batch, 3: new, 4: context},
        "chunked_new_mask": {0: batch, 3: new, 4: new},
        "global_new_mask": {0: batch, 3: new, 4: new},
        "rope_cos": {0: batch, 1: new},
        "rope_sin": {0: batch, 1: new},
        "temperature": {0: batch, 1: new},
        "token_valid": {0: torch.export.Dim.AUTO},  # batch * new
        "past_key": cache,
        "past_value": cache,
    }


def trace_layer(shape: ModelShape, kind: LayerKind) -> ir.Model:
    n = _example_sizes(shape)
    names = modules.DecoderLayer.inputs(shape, kind)

    def build():
        examples = _layer_example(shape, kind, n)
        return modules.DecoderLayer(shape, kind), tuple(examples[name] for name in names)

    batch, new = torch.export.Dim("batch"), torch.export.Dim("new")
    dims = _layer_dims(kind, batch, new, torch.export.Dim("context"), torch.export.Dim("ring"))
    constants = {"rope_rotation": modules.pair_rotation(shape.head_dim).numpy()} if kind.rope else {}
    # forward(hidden_states, *rest): dynamic shapes follow the argument structure
    structure = (dims[names[0]], tuple(dims[name] for name in names[1:]))
    return trace_template(build, structure, names, LAYER_OUTPUTS, constants)


def trace_prologue(shape: ModelShape, has_rope: bool | None = None, has_global: bool | None = None) -> ir.Model:
    """The prologue for the model's layer kinds, or (a pipeline stage's) for chunked and/or global ones only."""
    n = _example_sizes(shape)
    has_rope = any(shape.rope_layers) if has_rope is None else has_rope
    has_global = (not all(shape.rope_layers)) if has_global is None else has_global
    batch, new = torch.export.Dim("batch"), torch.export.Dim("new")
    # forward(position_ids, past_lengths, *past_keys): the first chunked, then the first global cache
    caches = [("chunked_past_key", "ring")] * has_rope + [("global_past_key", "context")] * has_global

    def build():
        args = [torch.zeros(n["batch"], n["new"], dtype=torch.int64), torch.zeros(n["batch"], dtype=torch.int64)]
        args += [torch.zeros(n["batch"], shape.num_kv_heads, n[dim], shape.head_dim) for _, dim in caches]
        return modules.Prologue(shape, has_rope, has_global), tuple(args)

    extra = tuple({0: batch, 2: torch.export.Dim(dim)} for _, dim in caches)
    dims = ({0: batch, 1: new}, {0: batch}, extra)
    names = ("position_ids", "past_lengths") + tuple(name for name, _ in caches)
    # each frequency twice (once per member of its pair), as Prologue holds it
    constants = {"rope_inv_freq": np.repeat(np.asarray(shape.rope_inv_freq(), dtype=np.float32), 2)} if has_rope else {}
    return trace_template(build, tuple(dims), names, modules.Prologue.outputs(shape, has_rope, has_global), constants)


def trace_embed(shape: ModelShape) -> ir.Model:
    n = _example_sizes(shape)
    dims = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("new")},)

    def build():
        return modules.Embed(shape), (torch.zeros(n["batch"], n["new"], dtype=torch.int64),)

    return trace_template(build, dims, ("input_ids",), ("hidden_states",))


def trace_head(shape: ModelShape) -> ir.Model:
    n = _example_sizes(shape)
    dims = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("new")},)

    def build():
        return modules.Head(shape), (torch.zeros(n["batch"], n["new"], shape.hidden_size),)

    return trace_template(build, dims, ("hidden_states",), ("logits",))


_TEMPLATES: dict[str, dict[str, ir.Model]] = {}
_STAGE_PROLOGUES: dict[tuple[str, str], ir.Model] = {}


def prologue_template(shape: ModelShape, has_rope: bool, has_global: bool) -> str:
    """Name of the prologue template serving layers with these kinds: `prologue` for the model's own
    kinds, `prologue.chunked` / `prologue.global` for a pipeline stage that has only one of them."""
    if (has_rope, has_global) == (any(shape.rope_layers), not all(shape.rope_layers)):
        return "prologue"
    return "prologue.chunked" if has_rope else "prologue.global"


def trace_templates(shape: ModelShape, prologues: tuple[tuple[bool, bool], ...] = ()) -> dict[str, ir.Model]:
    """Every template a model of this shape needs: embed, head, prologue and one per layer kind
    present, plus the prologues of `prologues` ((has_rope, has_global) of pipeline stages).

    Memoized per shape within the process (linking clones templates, never mutates them)."""
    key = json.dumps(shape.to_dict(), sort_keys=True)
    if key not in _TEMPLATES:
        templates = {"embed": trace_embed(shape), "prologue": trace_prologue(shape), "head": trace_head(shape)}
        for kind in dict.fromkeys(shape.layer_kinds):
            templates[kind.name] = trace_layer(shape, kind)
        _TEMPLATES[key] = templates
    templates = dict(_TEMPLATES[key])  # the model's own set; stage prologues only where asked for
    for has_rope, has_global in prologues:
        name = prologue_template(shape, has_rope, has_global)
        if name not in templates:
            if (key, name) not in _STAGE_PROLOGUES:
                _STAGE_PROLOGUES[(key, name)] = trace_prologue(shape, has_rope, has_global)
            templates[name] = _STAGE_PROLOGUES[(key, name)]
    return templates


# -- cached templates (llama4_deploy/build/cache.py) ------------------------------------------------
_ORDER_KEY = "llama4_deploy.template_initializers"  # every initializer's name, in the template's order
_WEIGHTS_KEY = "llama4_deploy.template_weights"  # the data-less ones, saved as graph inputs


def save_templates(templates: dict[str, ir.Model], directory) -> None:
    """Write templates as ONNX files `<name>.onnx`. A template's weights have no data, which ONNX
    cannot store as initializers: they are written as typed graph inputs and listed in the model's
    metadata, and `load_templates` turns them back into data-less initializers, in the same order."""
    directory = Path(directory)
    for name, template in templates.items():
        proto = ir.serde.serialize_model(template)
        initializers = list(template.graph.initializers.values())
        weights = [value for value in initializers if value.const_value is None]
        proto.graph.input.extend(ir.serde.serialize_value(value) for value in weights)
        for key, names in ((_ORDER_KEY, [v.name for v in initializers]), (_WEIGHTS_KEY, [v.name for v in weights])):
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, json.dumps(names)
        onnx.save_model(proto, str(directory / f"{name}.onnx"))


def load_templates(directory, names) -> dict[str, ir.Model]:
    """The templates `save_templates` wrote, as trace_templates returns them."""
    templates = {}
    for name in names:
        model = ir.load(Path(directory) / f"{name}.onnx")
        order = json.loads(model.metadata_props.pop(_ORDER_KEY))
        weights = set(json.loads(model.metadata_props.pop(_WEIGHTS_KEY)))
        graph = model.graph
        values = dict(graph.initializers)
        for value in [v for v in graph.inputs if v.name in weights]:
            graph.inputs.remove(value)
            values[value.name] = value
        graph.initializers.clear()
        for initializer in order:
            graph.initializers[initializer] = values[initializer]
        templates[name] = model
    return templates
