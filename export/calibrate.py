"""Calibration for static activation scales (fp8): which tokens, and the |max| each linear layer sees.

    ids    = calibration_ids(FILE or None, checkpoint)   # text lines (the checkpoint's tokenizer) or a
                                                         # JSON list of token-id lists; None: seeded random
    amax   = collect_amax(checkpoint_dir, ids)           # {"layers.3.q": |max| of q's input, ...}

The ranges are observed on transformers' fp32 modules of the checkpoint (the reference every engine is
checked against) through forward pre-hooks on the decoder's linear layers and the experts' two matmuls
(export/simulate.py names them). The bundle stores them (`calibration.json`) next to the manifest's record
of where the tokens came from.

Layer by layer (`collect_amax`, the build's): export/layerwise.py's runner (the model on the meta device, each
decoder layer in turn materialized from the checkpoint, run on every sequence's hidden states with the hooks
on, and dropped; the same runner gives verify its reference). Memory: one layer's weights plus the calibration
activations (one [tokens, hidden] tensor per sequence and the masks), never the model. `collect_amax_whole_model`
runs the whole transformers model; a test checks the two agree.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from llama4_deploy.export import layerwise
from llama4_deploy.export.observe import linear_inputs
from llama4_deploy.export.reference import checkpoint_model
from llama4_deploy.export.shape import ModelShape
from llama4_deploy.runtime.paths import PathError, read_utf8

RANDOM_SEQUENCES = 8
RANDOM_TOKENS = 64
RANGES_FILE = "calibration.json"


class CalibrationError(ValueError):
    """Unusable calibration input; the message is one sentence."""


def calibration_ids(path: str | Path | None, checkpoint, seed: int = 0) -> list[list[int]]:
    vocab = checkpoint.shape.vocab_size
    if path is None:
        rng = np.random.default_rng(seed)
        return [[int(t) for t in rng.integers(0, vocab, RANDOM_TOKENS)] for _ in range(RANDOM_SEQUENCES)]
    path = Path(path)
    try:
        text, _ = read_utf8(path, "calibration file")
    except PathError as err:
        raise CalibrationError(str(err)) from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise CalibrationError(f"calibration file {path} is not valid JSON ({err})") from None
        if not (
            isinstance(data, list)
            and data
            and all(
                isinstance(s, list) and s and all(isinstance(t, int) and not isinstance(t, bool) for t in s)
                for s in data
            )
        ):
            raise CalibrationError(
                f"calibration file {path} must hold a non-empty JSON list of non-empty token-id lists"
            )
        bad = next((t for s in data for t in s if not 0 <= t < vocab), None)
        if bad is not None:
            raise CalibrationError(f"calibration file {path} has token id {bad}, outside the vocabulary [0, {vocab})")
        return data
    if checkpoint.tokenizer_file is None:
        raise CalibrationError(
            f"calibration file {path} is text, but the checkpoint has no tokenizer.json to encode it;"
            " give a JSON list of token-id lists instead"
        )
    tokenizer = Tokenizer.from_file(str(checkpoint.tokenizer_file))
    ids = [tokenizer.encode(line).ids for line in text.splitlines() if line.strip()]
    ids = [s for s in ids if s]
    if not ids:
        raise CalibrationError(f"calibration file {path} has no text to encode")
    return ids


def run_layer_by_layer(
    checkpoint_dir: str | Path,
    ids: list[list[int]],
    record: Callable[[str, Any], Any],
    after_layer: Callable[[int], None] | None = None,
) -> None:
    """Run the checkpoint's decoder over `ids` one layer at a time (export/layerwise.py), calling `record(weight
    name, activation)` for every quantized linear layer's input (export/simulate.py's hooks) and
    `after_layer(index)` once a layer has seen every sequence. Memory: one layer's weights plus the activations."""
    weights = layerwise.CheckpointWeights(checkpoint_dir)
    hooks = lambda model, index: linear_inputs(model, weights.shape, record, layers=[index])  # noqa: E731
    layerwise.run_layer_by_layer(weights, [layerwise.Pass(ids, hooks)], logits=False, after_layer=after_layer)


def collect_amax(checkpoint_dir: str | Path, ids: list[list[int]]) -> dict[str, float]:
    """|max| of every quantized linear layer's input, layer by layer (memory: one layer + the activations)."""
    amax: dict[str, float] = {}

    def record(name, x):
        amax[name] = max(amax.get(name, 0.0), float(x.detach().abs().max()))
        return x

    run_layer_by_layer(checkpoint_dir, ids, record)
    return amax


def collect_amax_whole_model(checkpoint_dir: str | Path, ids: list[list[int]]) -> dict[str, float]:
    """The same ranges from transformers' whole model in one piece (O(model) memory): the layer-by-layer check."""
    model = checkpoint_model(checkpoint_dir)
    shape = ModelShape.from_config(model.config.to_dict())
    amax: dict[str, float] = {}

    def record(name, x):
        amax[name] = max(amax.get(name, 0.0), float(x.detach().abs().max()))
        return x

    handles = linear_inputs(model, shape, record)
    with torch.no_grad():
        for sequence in ids:
            model(input_ids=torch.tensor([sequence]), use_cache=False)
    for handle in handles:
        handle.remove()
    return amax


def write_ranges(bundle: Path, amax: dict[str, float], source: str | None, ids: list[list[int]]) -> dict[str, Any]:
    (bundle / RANGES_FILE).write_text(json.dumps({"activation_amax": amax}, indent=1) + "\n")
    return {
        "file": RANGES_FILE,
        "source": source or "seeded random tokens",
        "sequences": len(ids),
        "tokens": sum(map(len, ids)),
    }
