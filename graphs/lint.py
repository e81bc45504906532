"""Static-shape lint: no tensor's shape may depend on tensor values.

Shapes may depend on the *dimensions* of the graph inputs, never on their *values*. Two kinds of
construct break that rule:

- ops whose output shape is value-dependent by definition (NonZero, Unique, Compress), control
  flow (Loop, If, Scan), and nodes of the project's high-level domain left unlowered;
- a shape-carrying input (Reshape's shape, Slice's starts/ends/axes/steps, TopK's K, ...) that is
  computed from tensor values rather than from input dimensions.

The second is a forward dataflow over the graph in topological order. A value is
*dimension-derived* when it is an initializer or a Constant output, the output of Shape or Size
(whatever their input: since every other rule holds, every shape in the graph is itself
dimension-derived), or the output of a node all of whose inputs are dimension-derived (or absent).
Graph inputs carry values, and so does everything computed from one; for each such value the lint
remembers one graph input it derives from, to name it in the report. Nodes inside subgraphs are
checked too, conservatively: a subgraph's own inputs carry values, and so do the outputs of a
node that holds a subgraph. Calls of the model's local functions are followed into the body.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import onnx_ir as ir

from llama4_deploy.graphs import ops

FORBIDDEN = {"NonZero", "Unique", "Compress", "Loop", "If", "Scan"}

_STANDARD = ("", "ai.onnx")
_REDUCE = (
    "ReduceSum",
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
)

# op type -> {input index: role}; the inputs whose *values* fix the output's shape.
SHAPE_INPUTS: dict[str, dict[int, str]] = {
    "Reshape": {1: "shape"},
    "Expand": {1: "shape"},
    "Slice": {1: "starts", 2: "ends", 3: "axes", 4: "steps"},
    "Tile": {1: "repeats"},
    "ConstantOfShape": {0: "shape"},
    "Range": {0: "start", 1: "limit", 2: "delta"},
    "TopK": {1: "K"},
    "Pad": {1: "pads", 3: "axes"},
    "Resize": {2: "scales", 3: "sizes"},
    "Upsample": {1: "scales"},
    "OneHot": {1: "depth"},
    "Split": {1: "split"},
    "SplitToSequence": {1: "split"},
    "Squeeze": {1: "axes"},
    "Unsqueeze": {1: "axes"},
    "CenterCropPad": {1: "shape", 2: "axes"},
    "Col2Im": {1: "image_shape", 2: "block_shape"},
    "MaxUnpool": {2: "output_shape"},
    "AffineGrid": {1: "size"},
    "DFT": {1: "dft_length", 2: "axis"},
    "STFT": {1: "frame_step", 3: "frame_length"},
    "MelWeightMatrix": {0: "num_mel_bins", 1: "dft_length"},
    "HannWindow": {0: "size"},
    "HammingWindow": {0: "size"},
    "BlackmanWindow": {0: "size"},
    **{reduce: {1: "axes"} for reduce in _REDUCE},
}

# Outputs whose values depend only on the input's shape (and attributes), never on its values.
_SHAPE_ONLY = {"Shape", "Size", "EyeLike"}
# Outputs that are values even though no input is (random draws).
_RANDOM = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


def lint_static(model: ir.Model) -> list[str]:
    """Problems found, one sentence each (empty when the graph is clean)."""
    problems = []
    for node in (
        node
        for graph in (model.graph, *model.functions.values())
        for node in ir.traversal.RecursiveGraphIterator(graph)
    ):
        if node.domain in _STANDARD and node.op_type in FORBIDDEN:
            problems.append(f"node {node.name} is {node.op_type}, whose output shape depends on values")
        elif node.domain == ops.DOMAIN:
            problems.append(f"node {node.name} is {node.domain}.{node.op_type}, which no backend runs (not lowered)")
    flow = _ValueFlow(model, problems)
    flow.graph(model.graph, {value: value.name or "a graph input" for value in model.graph.inputs})
    return problems


class _ValueFlow:
    """Forward dataflow: for each value, None if dimension-derived, else what its values come from."""

    def __init__(self, model: ir.Model, problems: list[str]):
        self.functions = model.functions
        self.problems = problems
        self.calls: list[ir.OperatorIdentifier] = []  # local-function call stack, against recursion

    def graph(self, graph: ir.Graph | ir.Function, origins: dict[ir.Value, str | None], prefix: str = "") -> None:
        """Walk `graph`'s nodes in topological order; `origins` holds the inputs and outer-scope values."""
        for value in graph.initializers.values() if isinstance(graph, ir.Graph) else ():
            origins.setdefault(value, None)  # an initializer that is also a graph input stays an input
        for node in _topological(graph):
            self.node(node, origins, prefix)

    def node(self, node: ir.Node, origins: dict[ir.Value, str | None], prefix: str) -> None:
        name = f"{prefix}{node.name}"
        standard = node.domain in _STANDARD
        sources = [self.origin(value, origins) for value in node.inputs]
        if standard:
            for index, role in SHAPE_INPUTS.get(node.op_type, {}).items():
                if index < len(sources) and sources[index] is not None:
                    self.problems.append(
                        f"node {name} is {node.op_type} whose {role} input is computed from the values of "
                        f"{sources[index]}, not from input dimensions"
                    )
        subgraphs = [graph for attr in node.attributes.values() for graph in _graphs(attr)]
        for graph in subgraphs:  # outer-scope values keep their origins; the subgraph's inputs carry values
            inner = dict(origins)
            inner.update({value: f"subgraph input {value.name} of node {name}" for value in graph.inputs})
            self.graph(graph, inner, f"{name}/")
        key = (node.domain, node.op_type, node.overload)
        outputs: Sequence[str | None]
        if standard and node.op_type in _SHAPE_ONLY:
            outputs = [None] * len(node.outputs)
        elif standard and node.op_type in _RANDOM:
            outputs = [f"the random draw of node {name}"] * len(node.outputs)
        elif subgraphs:
            outputs = [f"the outputs of node {name} ({node.op_type})"] * len(node.outputs)
        elif key in self.functions and key not in self.calls:
            outputs = self.call(self.functions[key], sources, f"{name}/")
        else:
            source = next((source for source in sources if source is not None), None)
            outputs = [source] * len(node.outputs)
        for value, source in zip(node.outputs, outputs):
            origins[value] = source

    def call(self, function: ir.Function, sources: list[str | None], prefix: str) -> list[str | None]:
        """Follow a local function's body with the call site's input origins; the outputs' origins."""
        origins: dict[ir.Value, str | None] = dict(zip(function.inputs, sources))
        self.calls.append(function.identifier())
        try:
            self.graph(function, origins, prefix)
        finally:
            self.calls.pop()
        return [self.origin(value, origins) for value in function.outputs]

    @staticmethod
    def origin(value: ir.Value | None, origins: dict[ir.Value, str | None]) -> str | None:
        if value is None:  # an absent optional input
            return None
        if value in origins:
            return origins[value]
        if value.const_value is not None and not value.is_graph_input():
            return None  # an initializer of an enclosing graph, or a value folded to a constant
        return "activations"  # produced outside anything walked: assume the worst


def _graphs(attr: ir.Attr) -> Iterable[ir.Graph]:
    if attr.is_ref():  # a function's attribute reference: resolved at the call, no graph here
        return ()
    if attr.type == ir.AttributeType.GRAPH:
        return (attr.value,)
    if attr.type == ir.AttributeType.GRAPHS:
        return tuple(attr.value)
    return ()


def _topological(graph: ir.Graph | ir.Function) -> list[ir.Node]:
    """The nodes, producers first, without touching the graph (ONNX requires that order; make sure)."""
    nodes = list(graph)
    index = {node: i for i, node in enumerate(nodes)}
    deps = {
        node: [index[v.producer()] for v in _used(node) if v is not None and v.producer() in index] for node in nodes
    }
    if all(d < i for i, node in enumerate(nodes) for d in deps[node]):
        return nodes
    order: list[ir.Node] = []
    state = [0] * len(nodes)  # 0 unseen, 1 on the stack, 2 placed
    for root in range(len(nodes)):
        stack = [(root, 0)]
        while stack:
            i, k = stack.pop()
            if k == 0:
                if state[i]:
                    continue
                state[i] = 1
            children = deps[nodes[i]]
            while k < len(children) and state[children[k]]:
                k += 1  # placed, or on the stack (a cycle: take the graph's order)
            if k < len(children):
                stack += [(i, k + 1), (children[k], 0)]
            else:
                state[i] = 2
                order.append(nodes[i])
    return order


def _used(node: ir.Node) -> list[ir.Value | None]:
    """The node's inputs and the values its subgraphs read (the outer-scope ones among them)."""
    used = list(node.inputs)
    for attr in node.attributes.values():
        for graph in _graphs(attr):
            for inner in ir.traversal.RecursiveGraphIterator(graph):
                used += inner.inputs
    return used
