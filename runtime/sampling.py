"""Choosing the next token from a step's logits, one sampler for every entry point (`Engine.generate`, the
scheduler, the server), each row with its own parameters.

The logits of a row go through, in transformers' order (its `generate` builds the same list of processors):
1. penalties and bias: `repetition_penalty` (transformers' RepetitionPenaltyLogitsProcessor, over the prompt
   and the generated tokens), OpenAI's `frequency_penalty` and `presence_penalty` (over the generated tokens:
   `logit - count * frequency - (count > 0) * presence`), `logit_bias` (added), and `min_tokens` (the row's
   stop tokens masked until it has generated that many);
2. greedy rows (temperature 0) take the argmax; the others are divided by their temperature, then filtered by
   `top_k`, `top_p` (the smallest set of most likely tokens whose mass reaches top_p) and `min_p` (tokens at
   least min_p times as likely as the most likely one), and one token is drawn from what is left with the
   row's generator.

Every step is a few array operations over the rows [B, V]; a row asking for a feature costs it, one that does
not costs nothing. Letters: B batch rows, V vocab_size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

# OpenAI's ranges; vLLM's for the fields OpenAI does not have
PENALTY_RANGE = (-2.0, 2.0)  # presence_penalty, frequency_penalty
LOGIT_BIAS_RANGE = (-100.0, 100.0)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One row's sampling parameters; `check` validates them."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or vLLM's -1): off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] = dataclasses.field(default_factory=dict)
    min_tokens: int = 0

    def check(self, vocab_size: int) -> SamplingParams:
        """Raise ValueError, in one sentence naming the parameter, for a value the sampler cannot use."""

        def finite(name: str, value: float) -> None:
            if not math.isfinite(value):
                raise ValueError(f"{name} is {value}; it must be a finite number")

        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            finite(name, getattr(self, name))
        if self.temperature < 0:
            raise ValueError(f"temperature is {self.temperature}; it must be 0 (greedy) or more")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p is {self.top_p}; it must be in (0, 1]")
        if self.top_k < -1:
            raise ValueError(f"top_k is {self.top_k}; it must be -1 or 0 (off) or a positive count")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p is {self.min_p}; it must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not PENALTY_RANGE[0] <= value <= PENALTY_RANGE[1]:
                raise ValueError(f"{name} is {value}; it must be in [{PENALTY_RANGE[0]:g}, {PENALTY_RANGE[1]:g}]")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty is {self.repetition_penalty}; it must be more than 0")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens is {self.min_tokens}; it must be 0 or more")
        for token, bias in self.logit_bias.items():
            if not 0 <= token < vocab_size:
                raise ValueError(f"logit_bias has token id {token}, outside the vocabulary [0, {vocab_size})")
            finite(f"logit_bias of token {token}", bias)
            if not LOGIT_BIAS_RANGE[0] <= bias <= LOGIT_BIAS_RANGE[1]:
                raise ValueError(f"logit_bias of token {token} is {bias:g}; it must be in [-100, 100]")
        return self

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


class History:
    """What a row has seen, as its penalties need it: the prompt's tokens and the generated tokens' counts
    (arrays of V only for a row whose parameters use them)."""

    def __init__(self, prompt: Sequence[int], vocab_size: int, params: SamplingParams):
        self.generated = 0
        self.counts: np.ndarray | None = None  # [V] generated tokens' counts
        self.prompt_seen: np.ndarray | None = None  # [V]
        if params.penalized:
            self.counts = np.zeros(vocab_size, dtype=np.int32)
            self.prompt_seen = np.zeros(vocab_size, dtype=bool)
            self.prompt_seen[np.asarray(prompt, dtype=np.int64)] = True

    def add(self, token: int) -> None:
        self.generated += 1
        if self.counts is not None:
            self.counts[token] += 1


def penalize(
    logits: np.ndarray,
    params: Sequence[SamplingParams],
    histories: Sequence[History] | None,
    stop_tokens: Sequence[frozenset[int] | set[int]] | None = None,
) -> np.ndarray:
    """Step 1 on logits [B, V]: penalties, bias and the min_tokens mask; returns float64 [B, V]."""
    scores = logits.astype(np.float64)  # a copy: the caller's logits stay as the engine gave them
    for b, p in enumerate(params):
        history = histories[b] if histories is not None else None
        row = scores[b]
        if history is not None and history.counts is not None:
            if p.repetition_penalty != 1.0:
                seen = history.prompt_seen | (history.counts > 0)
                values = row[seen]
                row[seen] = np.where(values < 0, values * p.repetition_penalty, values / p.repetition_penalty)
            if p.frequency_penalty or p.presence_penalty:
                row -= p.frequency_penalty * history.counts + p.presence_penalty * (history.counts > 0)
        if p.logit_bias:
            row[np.fromiter(p.logit_bias, dtype=np.int64)] += np.fromiter(p.logit_bias.values(), dtype=np.float64)
        if p.min_tokens and stop_tokens is not None and history is not None and history.generated < p.min_tokens:
            row[np.fromiter(stop_tokens[b], dtype=np.int64)] = -np.inf
    return scores


def candidates(scores: np.ndarray, params: Sequence[SamplingParams]) -> tuple[np.ndarray, np.ndarray]:
    """Step 2 for sampled rows, on penalized scores [B, V]: (probs [B, V] after temperature and top-k, keep
    [B, V] the tokens top-k, top-p and min-p leave)."""
    batch, vocab = scores.shape
    temperature = np.array([p.temperature for p in params])[:, None]  # [B, 1]
    scaled = scores / temperature
    top_k = np.array([p.top_k if 0 < p.top_k < vocab else vocab for p in params])  # [B]
    if (top_k < vocab).any():
        kth = -np.partition(-scaled, top_k - 1, axis=-1)[np.arange(batch), top_k - 1]  # [B] k-th largest
        scaled = np.where(scaled < kth[:, None], -np.inf, scaled)  # ties with the k-th are kept, as transformers
    probs = np.exp(scaled - scaled.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    keep = probs > 0
    top_p = np.array([p.top_p for p in params])
    if (top_p < 1.0).any():
        order = np.argsort(-probs, axis=-1, kind="stable")
        cumulative = np.cumsum(np.take_along_axis(probs, order, -1), axis=-1)  # [B, V] mass of the i most likely
        count = (cumulative < top_p[:, None]).sum(-1) + 1  # the smallest set reaching top_p
        in_set = np.zeros_like(keep)
        np.put_along_axis(in_set, order, np.arange(vocab)[None, :] < count[:, None], -1)
        keep &= in_set | (top_p[:, None] >= 1.0)
    min_p = np.array([p.min_p for p in params])[:, None]
    if (min_p > 0).any():
        keep &= probs >= min_p * probs.max(-1, keepdims=True)
    return probs, keep


def sample(
    logits: np.ndarray,
    params: SamplingParams | Sequence[SamplingParams],
    rngs: np.random.Generator | Sequence[np.random.Generator],
    histories: Sequence[History] | None = None,
    stop_tokens: Sequence[frozenset[int] | set[int]] | None = None,
) -> np.ndarray:
    """Next token per row from logits [B, V]; one SamplingParams and generator for all rows, or one per row.
    Rows sharing a generator draw from it in row order."""
    batch = len(logits)
    params = [params] * batch if isinstance(params, SamplingParams) else list(params)
    rngs = [rngs] * batch if isinstance(rngs, np.random.Generator) else list(rngs)
    plain = all(p == SamplingParams(p.temperature, p.top_p) for p in params)
    scores = logits if plain else penalize(logits, params, histories, stop_tokens)
    chosen = np.asarray(scores.argmax(-1), dtype=np.int64)
    hot = [b for b in range(batch) if params[b].temperature > 0.0]
    if not hot:
        return chosen
    probs, keep = candidates(np.asarray(scores[hot], dtype=np.float64), [params[b] for b in hot])
    for i, b in enumerate(hot):
        order = np.argsort(-probs[i], kind="stable")
        kept = order[keep[i, order]]  # most likely first, as the draw has always gone
        chosen[b] = rngs[b].choice(kept, p=probs[i, kept] / probs[i, kept].sum())
    return chosen
