"""Link: assemble the model graph by stamping per-layer weights into traced templates.

    before:  templates {embed, head, <layer kind>...}, each a graph with placeholder weights
    after:   one graph  embed -> layers.0 -> ... -> layers.N-1 -> head, where every stamp's nodes
             and values are renamed under its prefix (`/layers.3/node_MatMul_2`) and its weights
             are lazy tensors named `layers.3.q`, read from the checkpoint only when saved

Valid because a template is a pure function of its inputs and weights: stamping it with layer
l's weights computes exactly layer l. Template constants that are not weights (RoPE
frequencies, scalars) are copied into each stamp unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import onnx_ir as ir


class LinkError(ValueError):
    pass


@dataclasses.dataclass
class Stamp:
    template: str
    prefix: str  # e.g. "layers.3"
    inputs: Mapping[str, str]  # template input name -> name of a graph input or "<prefix>.<output>"
    weights: Mapping[str, ir.TensorProtocol]  # deploy-form parameter name -> tensor (lazy)


def link(
    templates: Mapping[str, ir.Model],
    graph_inputs: Sequence[ir.Value],
    stamps: Sequence[Stamp],
    graph_outputs: Mapping[str, str],
    producer: str = "llama4-deploy",
) -> tuple[ir.Model, int]:
    """Return the linked model and the number of stamps; `graph_outputs` maps final name -> value."""
    values: dict[str, ir.Value] = {value.name: value for value in graph_inputs}
    nodes: list[ir.Node] = []
    initializers: list[ir.Value] = []
    opsets: dict[str, int] = {}
    for stamp in stamps:
        template = templates[stamp.template]
        opsets |= template.opset_imports
        graph = template.graph.clone()
        for template_input in graph.inputs:
            source = values.get(stamp.inputs.get(template_input.name, ""))
            if source is None:
                raise LinkError(f"{stamp.prefix}: template input {template_input.name!r} is not bound")
            ir.convenience.replace_all_uses_with(template_input, source)
        missing = set(stamp.weights) - set(graph.initializers)
        if missing:
            raise LinkError(f"{stamp.prefix}: template {stamp.template} has no weights {sorted(missing)}")
        for name, value in list(graph.initializers.items()):
            graph.initializers.pop(name)
            if name in stamp.weights:
                tensor = stamp.weights[name]
                if tuple(tensor.shape) != tuple(value.shape) or tensor.dtype != value.dtype:
                    raise LinkError(
                        f"{stamp.prefix}.{name}: weight is {tensor.dtype} {tuple(tensor.shape)}, "
                        f"template wants {value.dtype} {tuple(value.shape)}"
                    )
                value.const_value = tensor
            value.name = f"{stamp.prefix}.{name}"
            initializers.append(value)
        for output in graph.outputs:
            values[f"{stamp.prefix}.{output.name}"] = output
        stamp_nodes = list(graph)
        graph.outputs.clear()
        graph.remove(stamp_nodes, safe=False)
        for node in stamp_nodes:
            node.name = f"/{stamp.prefix}/{node.name}"
            for output in node.outputs:
                output.name = f"/{stamp.prefix}/{output.name}"
        nodes.extend(stamp_nodes)
    outputs = []
    for final_name, source_name in graph_outputs.items():
        value = values[source_name]
        value.name = final_name
        outputs.append(value)
    graph = ir.Graph(graph_inputs, outputs, nodes=nodes, initializers=initializers, opset_imports=opsets, name="llama4")
    return ir.Model(graph, ir_version=10, producer_name=producer), len(stamps)
