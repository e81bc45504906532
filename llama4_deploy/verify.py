"""Parity of a bundle against transformers' Llama4ForCausalLM, rebuilt from the bundle's source.

For a ragged batch of prompts that cross at least two attention chunks, the engine generates
greedily (prefill path, then decode path); transformers then runs each prompt plus the engine's
tokens in one uncached forward. Greedy agreement at every step means transformers' own greedy
decoding would have produced the same tokens. `score` is checked on both paths as well.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from llama4_deploy.compare import Comparison, compare, relative_logit_tolerance
from llama4_deploy.runtime import load, read_manifest

REL_TOLERANCE = 1e-3  # fp32 engine vs fp32 eager: summation order only, far below this


@dataclasses.dataclass
class Row:
    path: str
    prompt: int
    tokens: int
    comparison: Comparison
    greedy_agree: int
    greedy_total: int

    @property
    def ok(self) -> bool:
        return self.comparison.ok and self.greedy_agree == self.greedy_total


@dataclasses.dataclass
class Report:
    rows: list[Row]
    prompt_lengths: list[int]
    new_tokens: int
    chunk_size: int
    temperature_tuning_from: int | None
    graphs: dict[str, str]  # role -> MoE dispatch
    steps: int = 0
    overflow_reruns: int = 0
    evaluation: Any = None  # a trained checkpoint's held-out perplexity (llama4_deploy.evaluate.Evaluation)

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.rows)

    @property
    def max_abs_diff(self) -> float:
        return max(row.comparison.value for row in self.rows)

    def table(self) -> str:
        lines = [
            f"prompts {self.prompt_lengths} tokens + {self.new_tokens} new; chunk {self.chunk_size} "
            f"(positions cross up to {(max(self.prompt_lengths) + self.new_tokens - 1) // self.chunk_size} chunk "
            f"boundaries); temperature tuning active from position {self.temperature_tuning_from}",
            f"MoE dispatch {self.graphs}; {self.steps} engine steps, {self.overflow_reruns} rerun on the exact "
            f"graph after a capacity overflow",
            f"{'path':<16}{'prompt':>7}{'tokens':>8}{'max|dlogit|':>14}{'tolerance':>12}{'greedy':>10}  result",
        ]
        for row in self.rows:
            c = row.comparison
            lines.append(
                f"{row.path:<16}{row.prompt:>7}{row.tokens:>8}{c.value:>14.3e}{c.tolerance:>12.3e}"
                f"{f'{row.greedy_agree}/{row.greedy_total}':>10}  {'ok' if row.ok else 'FAIL: ' + str(c)}"
            )
        if self.evaluation is not None:
            lines.append(self.evaluation.summary())
        lines.append("PASS" if self.ok else "FAIL")
        return "\n".join(lines)


def default_prompt_lengths(chunk: int, context: int, new_tokens: int) -> list[int]:
    """Three ragged prompts, the longest crossing two chunk boundaries, within the context."""
    room = context - new_tokens
    lengths = [2 * chunk + 3, chunk + 3, 2 * chunk + chunk // 2]
    if max(lengths) > room:
        raise ValueError(f"the bundle's context ({context}) is too short to verify prompts crossing two chunks of {chunk}")
    return lengths


def verify(bundle: str, threads: int | None = None, log=print) -> Report:
    from llama4_deploy.export.reference import reference_logits, reference_model

    manifest = read_manifest(bundle)
    model = manifest.model
    settings = manifest.raw.get("verify") or {}
    new_tokens = settings.get("new_tokens", 32)
    chunk = model["attention_chunk_size"]
    lengths = settings.get("prompt_lengths") or default_prompt_lengths(chunk, manifest.max_context, new_tokens)
    rng = np.random.default_rng(1234)
    prompts = [[int(t) for t in rng.integers(0, manifest.vocab_size, size=n)] for n in lengths]

    log(f"[verify] rebuilding the transformers reference from {manifest.raw['source']['kind']} source")
    reference = reference_model(manifest.raw["source"])
    rows = []
    graphs = {role: graph["moe_dispatch"] for role, graph in manifest.engine["graphs"].items()}
    with load(bundle, threads=threads) as engine:
        log(f"[verify] generating {new_tokens} tokens for {len(prompts)} prompts")
        generation = engine.generate(prompts, new_tokens, stop_tokens=[], return_logits=True)
        longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
        for i, (prompt, tokens, logits) in enumerate(zip(prompts, generation.tokens, generation.logits)):
            expected_all = reference_logits(reference, prompt + tokens)
            expected = expected_all[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]
            tolerance = relative_logit_tolerance(expected, REL_TOLERANCE)
            agree = int((expected.argmax(-1) == np.array(tokens)).sum())
            rows.append(Row("generate", i, len(tokens), compare(logits, expected, tolerance), agree, len(tokens)))
            if i == longest:
                sequence, sequence_expected = prompt + tokens, expected_all
        for mode in ("prefill", "decode"):
            log(f"[verify] score through the {mode} path ({len(sequence)} tokens)")
            scored = engine.score(sequence, mode=mode)
            tolerance = relative_logit_tolerance(sequence_expected, REL_TOLERANCE)
            agree = int((scored.argmax(-1) == sequence_expected.argmax(-1)).sum())
            rows.append(Row(f"score:{mode}", longest, len(sequence), compare(scored, sequence_expected, tolerance),
                            agree, len(sequence)))
        steps, reruns = engine.steps, engine.overflow_reruns
    tuning = None
    if model.get("attn_temperature_tuning") and not all(model["rope_layers"]):
        tuning = int(model["floor_scale"]) - 1  # floor((p + 1) / floor_scale) >= 1
    return Report(rows, lengths, new_tokens, chunk, tuning, graphs, steps, reruns, _perplexity(bundle, manifest, threads, log))


def _perplexity(bundle, manifest, threads, log):
    """Held-out perplexity of a bundle built from a trained checkpoint that ships a held-out sample."""
    from llama4_deploy.evaluate import default_text, evaluate

    try:
        text = default_text(manifest)
    except ValueError:
        return None  # random weights: perplexity says nothing
    log(f"[verify] perplexity on {text.name}")
    return evaluate(bundle, text, threads=threads)
