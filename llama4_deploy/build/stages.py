"""Pipeline-parallel stages: which layers each stage graph holds.

A build with N stages writes N graphs per MoE dispatch in use. Stage 0 holds the embedding, the
last stage the final norm and lm_head; every stage holds a contiguous run of decoder layers, its
own prologue (masks and RoPE for the layer kinds it has) and its layers' caches, and hands
`hidden_states` [batch, new, hidden] to the next (docs/engine-abi.md, "Pipeline stages").

`split_layers` is the default split: contiguous, and among all contiguous splits the one whose
largest stage holds the fewest weight bytes (the embedding counted in the first stage, the head in
the last), so each stage's device holds about the same share of the weights. It takes bytes, not a
model, so the build (from the checkpoint's tensor shapes) and a planner (from config.json alone)
share it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from llama4_deploy.export import weights


@dataclasses.dataclass(frozen=True)
class Stage:
    index: int
    start: int  # first decoder layer
    stop: int  # one past the last decoder layer
    count: int  # stages in the split

    @property
    def layers(self) -> range:
        return range(self.start, self.stop)

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.count - 1


def split_layers(layer_bytes: Sequence[int], stages: int, first_bytes: int = 0, last_bytes: int = 0) -> list[Stage]:
    """Contiguous split of the layers into `stages` non-empty stages minimizing the largest stage's
    bytes (layer bytes, plus `first_bytes` in stage 0 and `last_bytes` in the last stage). Ties keep
    the earliest cut found, so the result is deterministic."""
    layers = len(layer_bytes)
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise ValueError(f"stages must be an integer of at least 1, got {stages!r}")
    if stages > layers:
        raise ValueError(f"{stages} stages exceed the model's {layers} layers; each stage needs at least one layer")
    prefix = [0]
    for size in layer_bytes:
        prefix.append(prefix[-1] + int(size))

    def stage_bytes(start: int, stop: int) -> int:
        return prefix[stop] - prefix[start] + (first_bytes if start == 0 else 0) + (last_bytes if stop == layers else 0)

    # best[k][j]: the smallest largest-stage bytes splitting layers [0, j) into k stages
    inf = float("inf")
    best = [[inf] * (layers + 1) for _ in range(stages + 1)]
    cut = [[0] * (layers + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for k in range(1, stages + 1):
        for j in range(k, layers - (stages - k) + 1):
            for i in range(k - 1, j):
                candidate = max(best[k - 1][i], stage_bytes(i, j))
                if candidate < best[k][j]:
                    best[k][j], cut[k][j] = candidate, i
    bounds = [layers]
    for k in range(stages, 0, -1):
        bounds.append(cut[k][bounds[-1]])
    bounds.reverse()
    return [Stage(s, bounds[s], bounds[s + 1], stages) for s in range(stages)]


def model_split(shape, stages: int, bytes_per_element: float = 4.0) -> list[Stage]:
    """`split_layers` over a model's weights as config.json sizes them (export/weights.py), at
    `bytes_per_element` (4: the fp32 graph; a uniform precision plan gives the same split)."""

    def size(sources) -> int:
        return int(sum(math.prod(s.checkpoint_shape) for s in sources.values()) * bytes_per_element)

    layer_bytes = [size(weights.layer_weights(shape, layer, kind)) for layer, kind in enumerate(shape.layer_kinds)]
    return split_layers(layer_bytes, stages, size(weights.embed_weights(shape)), size(weights.head_weights(shape)))
