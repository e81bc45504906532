"""Link and save the graphs of one pipeline stage (llama4_deploy/build/stages.py says which layers).

    stage 0:     input_ids ─► embed ─► prologue ─► layers[a:b] ─► hidden_states_out
    stage s:     hidden_states ─► prologue ─► layers[b:c] ─► hidden_states_out
    last stage:  hidden_states ─► prologue ─► layers[c:N] ─► head ─► logits
    one stage:   input_ids ─► embed ─► prologue ─► layers[0:N] ─► head ─► logits   (the unsplit model)

Every stage takes position_ids and past_lengths and its own layers' past_key.l / past_value.l, and
gives their present_key.l / present_value.l. The prologue is per stage (it computes only the
masks and RoPE tables of the layer kinds the stage holds), so stage s computes exactly what layers
[b:c] computed inside the unsplit graph. A middle stage's output is `hidden_states_out`, not
`hidden_states`, because ONNX value names are unique within a graph.

Files: a one-stage build writes `<dispatch>.onnx` and `weights.data` (the unsplit layout); stage s
of a split build writes `stage<s>.<dispatch>.onnx` sharing `stage<s>.weights.data`, so each stage's
device (or host) reads only its own weights.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx_ir as ir
from tqdm import tqdm

from llama4_deploy.build.stages import Stage
from llama4_deploy.build.weights_file import WeightsFile, write_tensor
from llama4_deploy.export import weights
from llama4_deploy.export.modules import Prologue
from llama4_deploy.export.trace import prologue_template
from llama4_deploy.graphs.link import Stamp, link
from llama4_deploy.graphs.moe_pass import OVERFLOW_OR
from llama4_deploy.runtime import abi
from llama4_deploy.runtime.integrity import CHUNK_KEY, LAYOUT_KEY, layout_fingerprint


@dataclasses.dataclass(frozen=True)
class EmbeddingsStage(Stage):
    """The first stage taking `hidden_states` instead of `input_ids` (one stage: the whole model): the text graph an
    image prompt's prefill runs first (the embedding step in front of it scatters image features into the patch
    positions); with several stages it hands `hidden_states_out` to stage 1's ordinary graphs. Linked like a later
    pipeline stage that holds the first stage's layers."""

    @property
    def first(self) -> bool:
        return False


EMBED_GRAPH = "embed"  # input_ids -> hidden_states: the embedding step, sharing the stage's weights file


def embeddings_graph_name(strategy: str) -> str:
    """The saved name (`<name>.onnx`) of the embeddings-input graph for one MoE dispatch."""
    return f"embeds.{strategy}"


def link_embed(checkpoint, templates, weight: Callable[[Any, str], Any]):
    """input_ids [batch, new] -> hidden_states [batch, new, hidden]: the embedding alone (the embed template)."""
    shape = checkpoint.shape
    ids = ir.Value(name=abi.INPUT_IDS, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch", "new"]))
    sources = weights.embed_weights(shape)
    stamp = Stamp(
        "embed", "embed", {"input_ids": abi.INPUT_IDS}, {k: weight(src, f"embed.{k}") for k, src in sources.items()}
    )
    return link(templates, [ids], [stamp], {abi.HIDDEN_IN: "embed.hidden_states"})


def file_prefix(stage: Stage) -> str:
    return "" if stage.count == 1 else f"stage{stage.index}."


def data_file(stage: Stage) -> str:
    return f"{file_prefix(stage)}weights.data"


def graph_file(stage: Stage, strategy: str) -> str:
    return f"{file_prefix(stage)}{strategy}.onnx"


def stage_inputs(shape, stage: Stage):
    """The engine ABI's inputs of one stage (docs/engine-abi.md)."""

    def value(name, dtype, dims):
        return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(dims))

    first = (
        value(abi.INPUT_IDS, ir.DataType.INT64, ["batch", "new"])
        if stage.first
        else value(abi.HIDDEN_IN, ir.DataType.FLOAT, ["batch", "new", shape.hidden_size])
    )
    inputs = [
        first,
        value(abi.POSITION_IDS, ir.DataType.INT64, ["batch", "new"]),
        value(abi.PAST_LENGTHS, ir.DataType.INT64, ["batch"]),
    ]
    for layer in stage.layers:
        slots = "ring" if shape.layer_kinds[layer].rope else "context"  # min(C, bucket) slots, or the context bucket
        dims = ["batch", shape.num_kv_heads, slots, shape.head_dim]
        inputs.append(value(abi.past_key(layer), ir.DataType.FLOAT, dims))
        inputs.append(value(abi.past_value(layer), ir.DataType.FLOAT, dims))
    return inputs


def stage_prologue(shape, stage: Stage) -> tuple[bool, bool]:
    """(has chunked layers, has global layers) of a stage: which prologue it needs."""
    kinds = [shape.layer_kinds[i] for i in stage.layers]
    return any(k.rope for k in kinds), any(not k.rope for k in kinds)


def link_stage(checkpoint, templates, stage: Stage, weight: Callable[[Any, str], Any]):
    """The linked graph of one stage; `weight(source, name)` gives the (lazy) tensor of a checkpoint
    weight. `templates` must hold the stage's prologue (export/trace.py, trace_templates)."""
    shape = checkpoint.shape

    def stamp_weights(prefix, sources):
        return {k: weight(s, f"{prefix}.{k}") for k, s in sources.items()}

    # bindings: {template's own name: the graph value it reads}; the templates' names are theirs, not the ABI's
    has_rope, has_global = stage_prologue(shape, stage)
    prologue_inputs = {"position_ids": abi.POSITION_IDS, "past_lengths": abi.PAST_LENGTHS}
    for scope, rope in (("chunked", True), ("global", False)):
        layers = [i for i in stage.layers if shape.layer_kinds[i].rope == rope]
        if layers:  # the prologue reads only this cache's slot count
            prologue_inputs[f"{scope}_past_key"] = abi.past_key(layers[0])
    stamps = []
    if stage.first:
        stamps.append(
            Stamp("embed", "embed", {"input_ids": abi.INPUT_IDS}, stamp_weights("embed", weights.embed_weights(shape)))
        )
        hidden = "embed.hidden_states"
    else:
        hidden = abi.HIDDEN_IN
    stamps.append(Stamp(prologue_template(shape, has_rope, has_global), "prologue", prologue_inputs, {}))
    shared = {name: f"prologue.{name}" for name in Prologue.outputs(shape, has_rope, has_global)}
    outputs = {}
    for layer in stage.layers:
        kind = shape.layer_kinds[layer]
        prefix = f"layers.{layer}"
        bindings = {
            **shared,
            "hidden_states": hidden,
            "past_key": abi.past_key(layer),
            "past_value": abi.past_value(layer),
        }
        stamps.append(
            Stamp(kind.name, prefix, bindings, stamp_weights(prefix, weights.layer_weights(shape, layer, kind)))
        )
        hidden = f"{prefix}.hidden_states_out"
        outputs[abi.present_key(layer)] = f"{prefix}.present_key"
        outputs[abi.present_value(layer)] = f"{prefix}.present_value"
    if stage.last:
        stamps.append(
            Stamp("head", "head", {"hidden_states": hidden}, stamp_weights("head", weights.head_weights(shape)))
        )
        final = {abi.LOGITS: "head.logits"}
    else:
        final = {abi.HIDDEN_OUT: hidden}
    model, stamped = link(templates, stage_inputs(shape, stage), stamps, {**final, **outputs})
    model.metadata_props[CHUNK_KEY] = str(shape.attention_chunk_size)  # checked at load (integrity.py)
    return model, stamped


@dataclasses.dataclass(frozen=True)
class CostingLayers:
    """The layers of the graph the MoE dispatch planner prices in place of the whole model (graphs/dispatch.py):
    the first layer of each kind (and a second MoE layer when the model has several of one kind only, so the
    overflow combiner below has an `Or` to price), with embed, prologue and head. It is linked as a one-stage
    model (link_stage takes it as a stage: `layers`, `first`, `last`) and lowered like it; its node costs sum to
    the whole model's when a layer's nodes count `stands_for[layer]` times, because a layer's nodes, shapes and
    weights depend on its kind, never on its index. Outside the layers only the capacity dispatch's overflow
    combiner grows with the model (graphs/moe_pass.py): one `Or` of two [1] flags per MoE layer after the first."""

    layers: tuple[int, ...]
    stands_for: dict[int, int]  # layer -> how many of the model's layers its nodes count for
    moe_layers: frozenset[int]  # the model's
    overflow_or: str  # name prefix of the combiner's Or nodes
    first: bool = True
    last: bool = True

    def multiplicity(self, node_name: str) -> int:
        """How many of the whole model's nodes the costing graph's node `node_name` stands for."""
        match = _LAYER_SCOPE.match(node_name)
        if match is not None:
            return self.stands_for[int(match.group(1))]
        if node_name.startswith(self.overflow_or):  # Or_0 .. Or_{m-2} here, Or_0 .. Or_{M-2} in the model
            here = sum(1 for layer in self.layers if layer in self.moe_layers)
            return len(self.moe_layers) - here + 1 if node_name == f"{self.overflow_or}0" else 1
        return 1


_LAYER_SCOPE = re.compile(r"/layers\.(\d+)/")


def costing_layers(shape) -> CostingLayers:
    """The CostingLayers of a model of this shape."""
    by_kind: dict[Any, list[int]] = {}
    for layer, kind in enumerate(shape.layer_kinds):
        by_kind.setdefault(kind, []).append(layer)
    stands_for = {layers[0]: len(layers) for layers in by_kind.values()}
    moe = [layers for kind, layers in by_kind.items() if kind.moe]
    if len(moe) == 1 and len(moe[0]) > 1:  # one MoE kind: a second of its layers gives the combiner an Or
        stands_for[moe[0][0]] -= 1
        stands_for[moe[0][1]] = 1
    return CostingLayers(tuple(sorted(stands_for)), stands_for, frozenset(shape.moe_layers), OVERFLOW_OR)


INLINE_BYTES = 256  # initializers this small stay inline in each graph, as onnx-ir's save keeps them
# O_DIRECT above this (buffered writes stall at the dirty limit); below, the page cache keeps it for golden, verify
DIRECT_BYTES = 2 << 30


def save_stage_graphs(models: dict[str, Any], directory: Path, stage: Stage) -> tuple[str, dict]:
    """Save each graph of a stage as `graph_file(stage, strategy)`, all referencing one external-data
    file, `data_file(stage)`. Returns the layout fingerprint and the data file's `file_record`, hashed from
    memory as it is written (llama4_deploy/build/weights_file.py) rather than by reading the file again.

    The union of their initializers is written once (streamed, one tensor at a time, packed in order) into that
    file, then each graph is saved pointing at those external tensors, carrying the fingerprint of that file's
    layout (returned) in its metadata_props.
    """
    union: dict[str, ir.Value] = {}
    for strategy, model in models.items():
        for name, value in model.graph.initializers.items():
            kept = union.setdefault(name, value)
            if (kept.dtype, tuple(kept.shape)) != (value.dtype, tuple(value.shape)):  # one name, one tensor
                raise ValueError(
                    f"weight {name} is {kept.dtype} {tuple(kept.shape)} in one graph and {value.dtype} "
                    f"{tuple(value.shape)} in the {strategy} graph"
                )
    label = "[save] weights" if stage.count == 1 else f"[save] stage {stage.index} weights"
    final = directory / data_file(stage)
    stored: dict[str, ir.ExternalTensor] = {}
    total = sum(v.const_value.nbytes for v in union.values() if v.const_value.nbytes > INLINE_BYTES)
    with (
        tqdm(total=total, unit="B", unit_scale=True, desc=label, file=sys.stderr, disable=None) as bar,
        WeightsFile(directory / f".{final.name}.partial", direct=total > DIRECT_BYTES) as out,
    ):
        for name, value in union.items():
            tensor, offset = value.const_value, out.tell()
            if tensor.nbytes <= INLINE_BYTES:  # stays in the graph (shape inference reads such constants)
                continue
            write_tensor(tensor, out)
            if out.tell() - offset != tensor.nbytes:
                raise ValueError(f"weight {name} wrote {out.tell() - offset} bytes, not its {tensor.nbytes}")
            stored[name] = ir.ExternalTensor(
                final.name,
                offset,
                tensor.nbytes,
                tensor.dtype,
                shape=ir.Shape(tensor.shape),
                name=name,
                base_dir=directory,
            )
            bar.update(tensor.nbytes)
        data_record = out.finish()
        out.path.replace(final)
    layout = layout_fingerprint(
        (name, t.offset or 0, t.length, t.dtype.name, tuple(t.shape)) for name, t in stored.items()
    )
    for strategy, model in models.items():
        for name, value in model.graph.initializers.items():
            if name in stored:
                value.const_value = stored[name]
        model.metadata_props[LAYOUT_KEY] = layout
        ir.save(model, directory / graph_file(stage, strategy))
    return layout, data_record
