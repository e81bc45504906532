"""Layer by layer: the engine's hidden state after each decoder layer against transformers', for verify's layer
bisection (the first layer whose hidden states leave the tolerance) and `verify --plot`.

The engine: each stage's prefill graph is loaded again, from memory, with every decoder layer's output
(`/layers.<l>/hidden_states_out`, the residual stream the link step names, graphs/link.py) added to its outputs and
its weights read from the bundle's files (the bundle is never written), and swapped in for the prefill runner while
`Engine.score` runs the sequence through the prefill path.
The reference: export/layerwise.py's layer-by-layer transformers model (with the bundle's fake-quant simulation where
verify uses one), each layer's output taken by a forward hook.

Each layer's hidden states are compared in logit units ("logit lens"): the reference's own final norm and lm_head
applied to both sides, so a layer's figure is read against the same relative tolerance as verify's logits, and
the last layer's figure is the logits' difference itself. The raw max |dhidden| is reported beside it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import torch
from transformers.models.llama4.modeling_llama4 import Llama4TextRMSNorm

from llama4_deploy.export import layerwise
from llama4_deploy.quality.compare import relative_logit_tolerance

LAYER_OUTPUT = "/layers.{}/hidden_states_out"


@dataclasses.dataclass
class LayerDiff:
    layer: int
    max_dlogit: float  # max |dlogit| of the logit lens over every position
    tolerance: float  # verify's relative logit tolerance, on the reference's lens logits of this layer
    max_dhidden: float  # max |dhidden| over every position and channel
    max_hidden: float  # max |hidden| of the reference, for scale
    # specs that round activations: verify's typical position (median over positions of max |dlogit|) against its
    # noise floor, since there a rounding flip moves max |dlogit| as much as a wiring error does
    typical: float | None = None
    typical_tolerance: float | None = None

    @property
    def ok(self) -> bool:
        typical_ok = self.typical is None or self.typical <= self.typical_tolerance
        return self.max_dlogit <= self.tolerance and typical_ok


@dataclasses.dataclass
class LayerReport:
    diffs: list[LayerDiff]
    tokens: int  # length of the sequence compared

    @property
    def first_bad(self) -> LayerDiff | None:
        return next((d for d in self.diffs if not d.ok), None)

    def table(self) -> str:
        lines = [
            f"layer by layer over {self.tokens} tokens (hidden states through the reference's final norm and lm_head):",
            f"{'layer':>6}{'max|dlogit|':>14}{'tolerance':>12}{'max|dhidden|':>15}{'max|hidden|':>13}  result",
        ]
        for d in self.diffs:
            typical = "" if d.typical is None else f"; typical position {d.typical:.3e} vs {d.typical_tolerance:.3e}"
            lines.append(
                f"{d.layer:>6}{d.max_dlogit:>14.3e}{d.tolerance:>12.3e}{d.max_dhidden:>15.3e}{d.max_hidden:>13.3e}"
                f"  {'ok' if d.ok else 'FAIL'}{typical}"
            )
        bad = self.first_bad
        if bad is None:
            lines.append("every layer within the tolerance")
        else:
            figure = (
                f"max|dlogit| {bad.max_dlogit:.3e} > {bad.tolerance:.3e}"
                if bad.max_dlogit > bad.tolerance
                else f"typical position {bad.typical:.3e} > {bad.typical_tolerance:.3e}"
            )
            lines.append(f"first layer outside the tolerance: layer {bad.layer} ({figure}); the layers before it agree")
        return "\n".join(lines)


def _probed_graph(bundle: Path, file: str, layers) -> bytes:
    """Graph `file` of the bundle, serialized with each layer's output added to the graph outputs (its weights stay
    in the bundle's external data files)."""
    model = onnx.load(str(bundle / file), load_external_data=False)
    typed = {value.name: value for value in model.graph.value_info}
    for layer in layers:
        name = LAYER_OUTPUT.format(layer)
        if name not in typed:
            raise ValueError(f"{file} has no typed value {name}; it was not linked by this version of the tool")
        model.graph.output.append(typed[name])
    return model.SerializeToString()


class _Capture:
    """Stands in for a prefill runner: runs the probed graph and keeps each step's layer outputs."""

    def __init__(self, runner, engine, steps: dict):
        self.runner, self.engine, self.steps = runner, engine, steps

    def infer(self, feeds):
        return self._keep(self.runner.infer(feeds))

    def infer_in_place(self, feeds, shared, key=None, buffers=None):
        """The gqa attention form's call (the cache written in place; runtime/onnxruntime_backend.py)."""
        return self._keep(self.runner.infer_in_place(feeds, shared, key, buffers))

    def _keep(self, outputs):
        # keyed by the engine's step: an overflow rerun on the exact graph replaces its step's record
        self.steps[self.engine.steps] = {name: value for name, value in outputs.items() if "/layers." in name}
        return {name: value for name, value in outputs.items() if "/layers." not in name}


def engine_hidden_states(engine, ids: list[int]) -> np.ndarray:
    """The engine's hidden state after every decoder layer for `ids` through the prefill path: [L, T, H] float32."""
    from llama4_deploy.runtime.onnxruntime_backend import OnnxRuntimeRunner

    if engine.backend != "onnxruntime":
        raise ValueError("layer-by-layer hidden states are read through ONNX Runtime; this engine runs on TensorRT")
    bundle = engine.manifest.path
    steps: dict[int, dict] = {}
    saved = dict(engine.runners)
    try:
        for stage in engine.stages:
            for role in ("prefill", "exact"):
                graph = stage.graphs.get(role)
                if graph is None or isinstance(engine.runners[graph["file"]], _Capture):
                    continue
                probed = _probed_graph(bundle, graph["file"], stage.layers)
                runner = OnnxRuntimeRunner(
                    bundle / graph["file"], threads=saved[graph["file"]].threads, prepack=False, serialized=probed
                ).activate()
                engine.runners[graph["file"]] = _Capture(runner, engine, steps)
        engine.score(ids, mode="prefill")
    finally:
        engine.runners.clear()
        engine.runners.update(saved)
    layers = sorted({int(name.split(".")[1].split("/")[0]) for record in steps.values() for name in record})
    return np.stack(
        [
            np.concatenate([steps[s][LAYER_OUTPUT.format(layer)][0] for s in sorted(steps)]).astype(np.float32)
            for layer in layers
        ]
    )


class _KeepHead:
    """The reference's weights, keeping the final norm and lm_head run_layer_by_layer reads last (for the lens)."""

    def __init__(self, weights):
        self.weights, self.config, self.kept = weights, weights.config, None

    def embedding(self):
        return self.weights.embedding()

    def layer(self, index):
        return self.weights.layer(index)

    def head(self):
        self.kept = self.weights.head()
        return self.kept


def reference_hidden_states(weights, ids: list[int], simulation=None):
    """transformers' hidden state after every decoder layer, [L, T, H] float32, and the lens (final norm + lm_head)
    as a function of hidden states [T, H] -> logits [T, V]."""
    kept = _KeepHead(weights)
    states: dict[int, np.ndarray] = {}

    def prepare(model, index):
        handles = (simulation(model, index) or []) if simulation is not None else []

        def keep(module, args, output):
            states[index] = output[0].float().numpy().copy()

        return [*handles, model.model.layers[index].register_forward_hook(keep)]

    layerwise.run_layer_by_layer(kept, [layerwise.Pass([ids], prepare)])
    norm_weight, head_weight = kept.kept
    config = weights.config
    norm = Llama4TextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    norm.weight = torch.nn.Parameter(norm_weight, requires_grad=False)

    def lens(hidden: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return (norm(torch.from_numpy(hidden)) @ head_weight.T).numpy()

    return np.stack([states[i] for i in sorted(states)]), lens


def layer_report(
    engine,
    weights,
    ids: list[int],
    rel_tolerance: float,
    simulation=None,
    floor: float = 0.0,
    typical_floor: float | None = None,
):
    """Engine against reference after every decoder layer; `floor`: the smallest tolerance of max |dlogit| (verify's
    rounding-noise bound for specs that round activations); `typical_floor`: for those specs, the smallest tolerance
    of the typical position (median over positions of max |dlogit|), checked as verify checks it."""
    actual = engine_hidden_states(engine, ids)
    expected, lens = reference_hidden_states(weights, ids, simulation)
    diffs = []
    for layer, (got, want) in enumerate(zip(actual, expected)):
        want_logits = lens(want)
        moved = np.abs(lens(got) - want_logits)  # [T, V]
        base = relative_logit_tolerance(want_logits, rel_tolerance)
        diffs.append(
            LayerDiff(
                layer,
                float(moved.max()),
                max(base, floor),
                float(np.abs(got - want).max()),
                float(np.abs(want).max()),
                None if typical_floor is None else float(np.median(moved.max(-1))),
                None if typical_floor is None else max(base, typical_floor),
            )
        )
    return LayerReport(diffs, len(ids))


def plot(report: LayerReport, path: str | Path, title: str) -> Path:
    """max |dlogit| (logit lens) and max |dhidden| per layer, with the tolerance, as a PNG (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt

    layers = [d.layer for d in report.diffs]
    fig, ax = plt.subplots(figsize=(7, 4))
    floor = 1e-12  # a log axis cannot show an exact zero
    ax.semilogy(layers, [max(d.max_dlogit, floor) for d in report.diffs], "o-", label="max |dlogit| (logit lens)")
    ax.semilogy(layers, [max(d.max_dhidden, floor) for d in report.diffs], "s--", label="max |dhidden|")
    ax.semilogy(layers, [d.tolerance for d in report.diffs], "k:", label="tolerance (logits)")
    bad = report.first_bad
    if bad is not None:
        ax.axvline(bad.layer, color="red", alpha=0.4, label=f"first layer outside: {bad.layer}")
    ax.set_xlabel("decoder layer")
    ax.set_xticks(layers)
    ax.set_ylabel("engine vs transformers")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
