"""The sampler against transformers' logits processors, on the same logits: the reference nobody here wrote.

Each batch mixes rows with different parameters (and rows that ask for nothing), so the per-row vectorized
paths are checked together. Tolerances: transformers works in float32, the sampler in float64, so values agree
to float32 rounding (rtol 1e-6); which tokens are filtered out must agree exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from llama4_deploy.runtime.sampling import History, SamplingParams, candidates, penalize, sample

V = 64


def logits_of(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, (batch, V)).astype(np.float32)  # [B, V]


def reference(processor, logits: np.ndarray, ids: list[list[int]] | None = None) -> np.ndarray:
    input_ids = torch.tensor(ids if ids is not None else [[0]] * len(logits))
    return processor(input_ids, torch.from_numpy(logits.copy())).numpy()


def kept_by(params: list[SamplingParams], logits: np.ndarray) -> np.ndarray:
    return candidates(logits.astype(np.float64), params)[1]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_top_k_against_transformers(temperature):
    logits = logits_of(4, 1)
    ks = [1, 5, 0, 63]  # 0: off
    params = [SamplingParams(temperature=temperature, top_k=k) for k in ks]
    keep = kept_by(params, logits)
    for b, k in enumerate(ks):
        scaled = reference(TemperatureLogitsWarper(temperature), logits[b : b + 1])
        expected = scaled if k == 0 else reference(TopKLogitsWarper(k), scaled)
        assert (keep[b] == np.isfinite(expected[0])).all(), k
    assert keep.sum(-1).tolist() == [1, 5, V, 63]


def test_top_p_against_transformers():
    logits = logits_of(5, 2)
    top_ps = [0.1, 0.5, 0.9, 0.99, 1.0]
    keep = kept_by([SamplingParams(temperature=1.0, top_p=p) for p in top_ps], logits)
    for b, top_p in enumerate(top_ps):
        expected = reference(TopPLogitsWarper(top_p), logits[b : b + 1]) if top_p < 1 else logits[b : b + 1]
        assert (keep[b] == np.isfinite(expected[0])).all(), top_p
    assert 1 <= keep[0].sum() < keep[2].sum() < V


def test_min_p_against_transformers_after_temperature_and_with_top_k():
    logits = np.repeat(logits_of(1, 3), 3, axis=0)  # one row of logits, three ways of filtering it
    rows = [SamplingParams(temperature=2.0, min_p=0.05), SamplingParams(temperature=2.0, min_p=0.3)]
    rows.append(SamplingParams(temperature=1.0, top_k=10, top_p=0.9, min_p=0.1))
    keep = kept_by(rows, logits)
    for b, p in enumerate(rows):
        scores = reference(TemperatureLogitsWarper(p.temperature), logits[b : b + 1])
        if p.top_k:
            scores = reference(TopKLogitsWarper(p.top_k), scores)
        if p.top_p < 1:
            scores = reference(TopPLogitsWarper(p.top_p), scores)
        expected = reference(MinPLogitsWarper(p.min_p), scores)
        assert (keep[b] == np.isfinite(expected[0])).all(), p
    assert 1 < keep[0].sum() < V and keep[1].sum() < keep[0].sum()


def test_repetition_penalty_against_transformers():
    logits = logits_of(3, 4)
    prompts, outputs = [[1, 2, 3], [4, 4, 9], [5]], [[7, 1], [], [6, 6, 6]]
    penalties = [1.3, 0.8, 1.0]
    params = [SamplingParams(repetition_penalty=r) for r in penalties]
    histories = []
    for prompt, output, p in zip(prompts, outputs, params):
        history = History(prompt, V, p)
        for token in output:
            history.add(token)
        histories.append(history)
    scores = penalize(logits, params, histories)
    for b, penalty in enumerate(penalties):
        expected = reference(RepetitionPenaltyLogitsProcessor(penalty), logits[b : b + 1], [prompts[b] + outputs[b]])
        np.testing.assert_allclose(scores[b], expected[0], rtol=1e-6)
    assert not np.allclose(scores[0], logits[0])


def test_presence_and_frequency_penalties_follow_openai_s_formula():
    # transformers has no processor for these; OpenAI's documented formula, over the generated tokens only:
    # logit[j] - count[j] * frequency_penalty - (count[j] > 0) * presence_penalty
    logits = logits_of(2, 5)
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=1.5), SamplingParams(presence_penalty=-2.0)]
    histories = [History([1, 2], V, p) for p in params]
    for token in (3, 3, 8):
        histories[0].add(token)
    histories[1].add(1)
    scores = penalize(logits, params, histories)
    expected = logits.astype(np.float64).copy()
    expected[0, 3] -= 2 * 1.5 + 0.5
    expected[0, 8] -= 1.5 + 0.5
    expected[1, 1] += 2.0  # the prompt's tokens are not penalized: only the generated 1 is
    np.testing.assert_allclose(scores, expected, rtol=1e-12)


def test_logit_bias_against_transformers_sequence_bias():
    logits = logits_of(2, 6)
    bias = {3: 100.0, 7: -100.0, 9: 2.5}
    params = [SamplingParams(logit_bias=bias), SamplingParams()]
    scores = penalize(logits, params, [History([0], V, p) for p in params])
    expected = reference(SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()]), logits[:1])
    np.testing.assert_allclose(scores[0], expected[0], rtol=1e-6)
    np.testing.assert_array_equal(scores[1], logits[1])
    assert sample(logits, params, np.random.default_rng(0), [History([0], V, p) for p in params])[0] == 3


def test_min_tokens_against_transformers_min_new_tokens():
    logits = logits_of(1, 7)
    logits[0, 2] = 50.0  # the stop token is by far the most likely
    params = SamplingParams(min_tokens=3)
    history = History([1, 1], V, params)
    for generated in range(5):
        ids = [[1, 1] + [5] * generated]
        expected = reference(MinNewTokensLengthLogitsProcessor(2, 3, [2]), logits, ids)
        scores = penalize(logits, [params], [history], [frozenset({2})])
        np.testing.assert_allclose(scores, expected, rtol=1e-6)
        token = int(sample(logits, params, np.random.default_rng(0), [history], [frozenset({2})])[0])
        assert (token == 2) == (generated >= 3)
        history.add(5)


def test_plain_parameters_draw_as_before_and_rows_draw_independently():
    # one generator per row: a row's draw does not depend on what the other rows ask for
    logits = logits_of(3, 8)
    alone = sample(logits[1:2], SamplingParams(temperature=0.9, top_p=0.8), np.random.default_rng(4))[0]
    rows = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.9, top_p=0.8),
        SamplingParams(temperature=1.0, top_k=3),
    ]
    rngs = [np.random.default_rng(s) for s in (1, 4, 2)]
    chosen = sample(logits, rows, rngs, [History([0], V, p) for p in rows])
    assert chosen[0] == logits[0].argmax() and chosen[1] == alone
    assert chosen[2] in np.argsort(-logits[2])[:3]


@pytest.mark.parametrize(
    "params, message",
    [
        (SamplingParams(top_k=-2), "top_k is -2"),
        (SamplingParams(min_p=1.5), "min_p is 1.5"),
        (SamplingParams(presence_penalty=2.5), r"presence_penalty is 2.5; it must be in \[-2, 2\]"),
        (SamplingParams(frequency_penalty=float("nan")), "frequency_penalty is nan"),
        (SamplingParams(repetition_penalty=0.0), "repetition_penalty is 0.0"),
        (SamplingParams(logit_bias={V: 1.0}), "logit_bias has token id 64, outside the vocabulary"),
        (SamplingParams(logit_bias={1: 101.0}), r"logit_bias of token 1 is 101; it must be in \[-100, 100\]"),
        (SamplingParams(min_tokens=-1), "min_tokens is -1"),
    ],
)
def test_out_of_range_parameters_are_refused_by_name(params, message):
    with pytest.raises(ValueError, match=message):
        params.check(V)
