"""Choosing the next token from a step's logits: greedy at temperature 0, else nucleus (top-p) sampling
with the caller's generator (`Engine.generate`: one per call; the scheduler: one per request).

Letters: B batch rows, V vocab_size.
"""

from __future__ import annotations

import numpy as np


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> np.ndarray:
    """Next token per row from logits [B, V]: greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0.0:
        return logits.argmax(-1)
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    chosen = np.empty(len(probs), dtype=np.int64)
    for row, p in enumerate(probs):
        order = np.argsort(-p, kind="stable")
        cumulative = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cumulative, top_p)) + 1]  # smallest set reaching top_p
        chosen[row] = rng.choice(keep, p=p[keep] / p[keep].sum())
    return chosen
