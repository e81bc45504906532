"""The engine ABI's input and output names: the code form of docs/engine-abi.md.

The build writes these names into every graph and into the manifest; the runtime feeds and reads
graphs by them. Every module that builds or feeds a graph takes the names from here.

Letters: B batch rows, T new tokens per row, H hidden_size, V vocab_size, K num_kv_heads, S cache
slots, D head_dim.
"""

from __future__ import annotations

from collections.abc import Iterable

INPUT_IDS = "input_ids"  # int64 [B, T]: the first stage's input (the embedding is inside)
HIDDEN_IN = "hidden_states"  # [B, T, H]: a later pipeline stage's input
HIDDEN_OUT = "hidden_states_out"  # [B, T, H]: what a stage before the last gives the next (ONNX names are unique)
POSITION_IDS = "position_ids"  # int64 [B, T]: absolute position of each new token, PAD_POSITION for padding
PAST_LENGTHS = "past_lengths"  # int64 [B]: tokens already in each row's cache
LOGITS = "logits"  # [B, T, V]: the last stage's output
MOE_OVERFLOW = "moe_overflow"  # bool [1]: only capacity graphs; true: rerun the step on the exact graph

PAD_POSITION = -1  # a position_ids entry that marks a padded token


def past_key(layer: int) -> str:
    """Input: layer `layer`'s cached keys [B, K, S, D]."""
    return f"past_key.{layer}"


def past_value(layer: int) -> str:
    """Input: layer `layer`'s cached values [B, K, S, D]."""
    return f"past_value.{layer}"


def present_key(layer: int) -> str:
    """Output: layer `layer`'s keys of the new tokens [B, K, T, D]."""
    return f"present_key.{layer}"


def present_value(layer: int) -> str:
    """Output: layer `layer`'s values of the new tokens [B, K, T, D]."""
    return f"present_value.{layer}"


def past_names(layers: Iterable[int]) -> list[str]:
    """The cache inputs of `layers`: each layer's key, then its value, in layer order."""
    return [name for layer in layers for name in (past_key(layer), past_value(layer))]


def present_names(layers: Iterable[int]) -> list[str]:
    """The new-token key/value outputs of `layers`: each layer's key, then its value, in layer order."""
    return [name for layer in layers for name in (present_key(layer), present_value(layer))]


def stage_io(layers: Iterable[int], first: bool, last: bool, overflow: bool = False) -> tuple[list[str], list[str]]:
    """(input names, output names) of a graph holding `layers`, in the order graphs and manifests list them.

    The first stage takes input_ids, a later one hidden_states; the last gives logits, an earlier one
    hidden_states_out; `overflow`: the graph (or, in a manifest, some graph of the stage) reports moe_overflow.
    The whole model is one stage, first and last."""
    layers = list(layers)
    inputs = [INPUT_IDS if first else HIDDEN_IN, POSITION_IDS, PAST_LENGTHS] + past_names(layers)
    outputs = [LOGITS if last else HIDDEN_OUT] + present_names(layers) + ([MOE_OVERFLOW] if overflow else [])
    return inputs, outputs
