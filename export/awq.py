"""AWQ for INT4 (activation-aware weight quantization, Lin et al. 2023): per-channel scale search, layer by layer,
folded into the weights so the graph is unchanged.

For linear weights W [K, N] (matmul layout) that read the same activation x, and any s > 0 per channel k:

    x @ W  ==  (x / s) @ (s[:, None] * W)                      exact in float

Scaling salient input channels (large mean |x_k|) up before INT4 rounding shrinks their relative rounding error.
The 1/s goes into the op that produces x, so the graph needs no extra node:

    group        weights scaled by s (rows)                       1/s folded into
    attn_in      q, k, v                                          input_norm (RMSNorm weight)
    ffn_in       mlp_gate, mlp_up (dense layers)                  post_norm
                 shared_gate, shared_up, experts_gate_up (MoE)    post_norm, and the router's rows x s (the router
                                                                  reads the same x and stays unquantized: exact)
    down         mlp_down / shared_down                           mlp_up / shared_up columns
                 experts_down, one s per expert                   that expert's up half of experts_gate_up
    o            not scaled (its input is attention's output; folding into v needs scales shared per GQA group)

Search (AutoAWQ's grid): s = mean|x|^alpha, normalized by sqrt(max * min), alpha in {0, 1/20, ..., 19/20};
alpha 0 is s = 1 (plain RTN), so the chosen scales never do worse than RTN on the calibration activations. The
loss is the summed squared output error of the group, sum ||x W - (x / s) Q(s W)||^2, with Q the spec's INT4
(graphs/quantize.py). Layer by layer (`run`): transformers' fp32 decoder layers run the calibration tokens one
layer at a time (export/calibrate.py's runner) and a layer's scales are searched from its own inputs before the
next layer runs; since the scaling is exact in float, the original model's activations are the scaled model's
too (the fp32 inputs are used, as AutoAWQ does, not the quantized model's).

Written here rather than taken from nvidia-modelopt 0.47: its INT4_AWQ_CFG runs on the CPU on Llama4ForCausalLM,
but leaves the stacked experts (Llama4TextExperts) at plain max calibration with blocks along the output axis (not
the reduction axis the spec and ONNX Runtime's kernels block), and keeps its per-Linear `pre_quant_scale` as an
extra multiply on each linear's input instead of folding it (q, k and v get different scales).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from llama4_deploy.export.calibrate import run_layer_by_layer
from llama4_deploy.export.weights import all_weights
from llama4_deploy.graphs.quantize import QuantRule, fake_quant

SCALES_FILE = "awq_scales.npz"
GRID = 20


def _fake_quant(w: np.ndarray, rule: QuantRule) -> np.ndarray:
    return fake_quant(w, rule, w.ndim - 2)


def search_scale(xs: list[np.ndarray], weights: list[np.ndarray], rule: QuantRule) -> np.ndarray:
    """The s [K] minimizing sum_j ||x_j W_j - (x_j / s) Q(s W_j)||^2 over the grid; `xs[j]` [T, K] is the activation
    weight `weights[j]` [K, N] reads (weights sharing one s)."""
    mean = np.concatenate([np.abs(x).reshape(-1, x.shape[-1]) for x in xs]).mean(0).astype(np.float64)
    mean = np.maximum(mean, 1e-8)
    outputs = [x @ w for x, w in zip(xs, weights)]
    best, best_loss = np.ones_like(mean, dtype=np.float32), None
    for step in range(GRID):
        alpha = step / GRID
        s = mean**alpha
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        loss = sum(
            float(((x / s) @ _fake_quant(w * s[:, None], rule) - y).astype(np.float64).__pow__(2).sum())
            for x, w, y in zip(xs, weights, outputs)
        )
        if best_loss is None or loss < best_loss:
            best, best_loss = s, loss
    return best


def search_layer(
    layer: int, kind, acts: Mapping[str, np.ndarray], weights: Callable[[str], np.ndarray], rule: QuantRule
) -> dict[str, np.ndarray]:
    """AWQ scales of one decoder layer's groups from its linear inputs `acts` (by weight name, [T, K]; experts
    [E, T, K] with zero rows for tokens not routed to an expert): {"layers.L.attn_in": s [H], "layers.L.ffn_in":
    [H], "layers.L.down": [M or I], "layers.L.experts_down": [E, I]}. `weights(name)`: a deploy-form weight."""
    p = f"layers.{layer}"
    scales = {f"{p}.attn_in": search_scale([acts[f"{p}.q"]] * 3, [weights(f"{p}.{n}") for n in "qkv"], rule)}
    if kind.moe:
        gate_up = weights(f"{p}.experts_gate_up")  # [E, H, 2I]
        xs = [acts[f"{p}.shared_gate"]] * 2 + list(acts[f"{p}.experts_gate_up"])
        ws = [weights(f"{p}.shared_gate"), weights(f"{p}.shared_up")] + list(gate_up)
        scales[f"{p}.ffn_in"] = search_scale(xs, ws, rule)
        scales[f"{p}.down"] = search_scale([acts[f"{p}.shared_down"]], [weights(f"{p}.shared_down")], rule)
        down = weights(f"{p}.experts_down")  # [E, I, H]
        scales[f"{p}.experts_down"] = np.stack(
            [search_scale([acts[f"{p}.experts_down"][e]], [down[e]], rule) for e in range(down.shape[0])]
        )
    else:
        scales[f"{p}.ffn_in"] = search_scale(
            [acts[f"{p}.mlp_gate"]] * 2, [weights(f"{p}.mlp_gate"), weights(f"{p}.mlp_up")], rule
        )
        scales[f"{p}.down"] = search_scale([acts[f"{p}.mlp_down"]], [weights(f"{p}.mlp_down")], rule)
    return scales


def transforms(shape, scales: Mapping[str, np.ndarray]) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Deploy weight name -> the AWQ rewrite of that weight (deploy layout, float32): the one place the folding
    rules live, used by the build's weight streaming and by the simulation alike."""
    out: dict[str, list[Callable[[np.ndarray], np.ndarray]]] = {}

    def add(name, fn):
        out.setdefault(name, []).append(fn)

    for layer, kind in enumerate(shape.layer_kinds):
        p = f"layers.{layer}"
        s = scales[f"{p}.attn_in"]
        for n in "qkv":
            add(f"{p}.{n}", lambda w, s=s: w * s[:, None])
        add(f"{p}.input_norm", lambda w, s=s: w / s)
        s = scales[f"{p}.ffn_in"]
        d = scales[f"{p}.down"]
        add(f"{p}.post_norm", lambda w, s=s: w / s)
        if kind.moe:
            for n in ("shared_gate", "shared_up", "router"):
                add(f"{p}.{n}", lambda w, s=s: w * s[:, None])
            add(f"{p}.experts_gate_up", lambda w, s=s: w * s[None, :, None])
            add(f"{p}.shared_down", lambda w, d=d: w * d[:, None])
            add(f"{p}.shared_up", lambda w, d=d: w / d[None, :])
            e = scales[f"{p}.experts_down"]  # [E, I]
            add(f"{p}.experts_down", lambda w, e=e: w * e[:, :, None])
            inter = e.shape[1]
            add(
                f"{p}.experts_gate_up",
                lambda w, e=e, i=inter: np.concatenate([w[..., :i], w[..., i:] / e[:, None, :]], -1),
            )
        else:
            for n in ("mlp_gate", "mlp_up"):
                add(f"{p}.{n}", lambda w, s=s: w * s[:, None])
            add(f"{p}.mlp_down", lambda w, d=d: w * d[:, None])
            add(f"{p}.mlp_up", lambda w, d=d: w / d[None, :])

    def chain(fns):
        def apply(w):
            w = np.asarray(w, dtype=np.float32)
            for fn in fns:
                w = fn(w)
            return w.astype(np.float32)

        return apply

    return {name: chain(fns) for name, fns in out.items()}


def write_scales(bundle: Path, scales: Mapping[str, np.ndarray]) -> dict:
    np.savez(bundle / SCALES_FILE, **scales)
    return {"awq_scales": SCALES_FILE, "groups": len(scales)}


def read_scales(bundle: Path, record: Mapping) -> dict[str, np.ndarray]:
    with np.load(bundle / record["awq_scales"], allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def run(
    checkpoint_dir: str | Path,
    checkpoint,
    ids: list[list[int]],
    rule: QuantRule,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, np.ndarray]:
    """AWQ scales for a checkpoint (the build's entry point), layer by layer: transformers' fp32 decoder layers run
    the calibration tokens one layer at a time (export/calibrate.py), and each layer's scales are searched from
    its own inputs before the next layer runs. Memory: one layer's weights and inputs plus the hidden states."""
    sources = all_weights(checkpoint.shape)
    kinds = checkpoint.shape.layer_kinds
    seen: dict[str, list[np.ndarray]] = {}
    scales: dict[str, np.ndarray] = {}

    def weight(name: str) -> np.ndarray:
        source = sources[name]
        w = checkpoint.tensor(source.checkpoint_name).float().numpy()
        return np.swapaxes(w, -1, -2) if source.transpose else w

    def record(name, x):
        experts = name.endswith(("experts_gate_up", "experts_down"))
        seen.setdefault(name, []).append(
            x.detach().float().numpy().reshape((x.shape[0], -1, x.shape[-1]) if experts else (-1, x.shape[-1]))
        )
        return x

    def after_layer(index: int) -> None:
        acts = {name: np.concatenate(parts, axis=-2) for name, parts in seen.items()}
        seen.clear()
        scales.update(search_layer(index, kinds[index], acts, weight, rule))
        log(f"[awq] layer {index}: scales searched")

    run_layer_by_layer(checkpoint_dir, ids, record, after_layer)
    return scales
