"""Long-context retrieval on the engine as built: a passkey ("needle") hidden in filler text ("haystack") at a
given depth of a prompt of a given length, the engine asked for it, its greedy answer scored by exact match
(`llama4-deploy eval BUNDLE --needle`).

The grid, by default: prompt lengths doubling from 256 up to the bundle's context (less the answer's tokens),
plus the attention chunk's boundary and a length just past it (where RoPE layers stop seeing the start of the
prompt and only the NoPE global layers can reach the needle); depths 0-100% in 5 steps; 5 trials per cell, each
with its own key and its own stretch of the haystack. The layout of a prompt is that of the passkey test
(Mohtashami & Jaggi, "Landmark Attention", 2023; RULER's passkey task):

    INTRO | haystack[: depth] | NEEDLE(key) | haystack[depth :] | QUESTION  -> the engine continues: " <key>"

Pieces are encoded separately and concatenated as token ids, so the prompt is exactly the cell's length and the
needle sits at exactly its depth (depth d: the needle starts after round(d x haystack tokens) haystack tokens).
A trial is correct when the first run of digits in the answer is the key, digit for digit.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from llama4_deploy.runtime import load, read_manifest
from llama4_deploy.runtime.paths import read_utf8
from llama4_deploy.runtime.tokenizer import load_tokenizer

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"
KEY_DIGITS = 5
# Tokens generated per trial: the most the key can take (one token per character of " <key>", the most any byte-level
# or digit-splitting tokenizer makes of it) and one more. A budget sized on one key's tokens cuts off keys whose
# digits the tokenizer splits further, and scores a right answer wrong.
ANSWER_TOKENS = KEY_DIGITS + 2
FIRST_LENGTH = 256
DEPTH_STEPS = 5
TRIALS = 5
SEED = 0


@dataclasses.dataclass
class Trial:
    length: int  # prompt tokens
    depth: float  # 0..1: where the needle starts within the haystack
    trial: int
    key: str
    haystack_offset: int  # first haystack token used
    needle_at: int  # token index of the needle's first token in the prompt
    answer: str = ""
    correct: bool = False


@dataclasses.dataclass
class Sweep:
    bundle: str
    haystack: str
    lengths: list[int]
    depths: list[float]
    trials: list[Trial]
    chunk: int
    max_context: int
    temperature_tuning: bool

    def accuracy(self) -> np.ndarray:
        """[len(lengths), len(depths)] fraction of correct trials."""
        grid = np.zeros((len(self.lengths), len(self.depths)))
        counts = np.zeros_like(grid)
        for t in self.trials:
            i, j = self.lengths.index(t.length), self.depths.index(t.depth)
            grid[i, j] += t.correct
            counts[i, j] += 1
        return grid / np.maximum(counts, 1)

    def table(self, title: str | None = None) -> str:
        return accuracy_table(self.accuracy(), self.lengths, self.depths, title or self.describe())

    def describe(self) -> str:
        per_cell = len(self.trials) // max(1, len(self.lengths) * len(self.depths))
        return (
            f"needle retrieval, {Path(self.bundle).name}: accuracy (%) by prompt length (rows) x needle depth "
            f"(columns), {per_cell} trials per cell, exact match; haystack {Path(self.haystack).name}; attention "
            f"chunk {self.chunk}, context {self.max_context}, temperature tuning "
            f"{'on' if self.temperature_tuning else 'off'}"
        )

    def record(self) -> dict:
        return {
            "bundle": self.bundle,
            "haystack": self.haystack,
            "lengths": self.lengths,
            "depths": self.depths,
            "chunk": self.chunk,
            "max_context": self.max_context,
            "temperature_tuning": self.temperature_tuning,
            "accuracy": self.accuracy().tolist(),
            "trials": [dataclasses.asdict(t) for t in self.trials],
        }

    @classmethod
    def from_record(cls, record: dict) -> Sweep:
        """The Sweep a `record()` (one entry of needle.json) describes."""
        fields = ("bundle", "haystack", "lengths", "depths")
        return cls(
            *(record[f] for f in fields),
            [Trial(**trial) for trial in record["trials"]],
            record["chunk"],
            record["max_context"],
            record["temperature_tuning"],
        )


def accuracy_table(grid: np.ndarray, lengths, depths, title: str, signed: bool = False) -> str:
    width = 7
    lines = [title, f"{'length':>8}" + "".join(f"{f'{d:.0%}':>{width}}" for d in depths) + f"{'mean':>{width}}"]
    for length, row in zip(lengths, grid):
        cells = "".join(f"{v * 100:>+{width}.0f}" if signed else f"{v * 100:>{width}.0f}" for v in row)
        mean = row.mean() * 100
        lines.append(f"{length:>8}" + cells + (f"{mean:>+{width}.0f}" if signed else f"{mean:>{width}.0f}"))
    return "\n".join(lines)


def default_lengths(max_context: int, chunk: int, answer_tokens: int, shortest: int) -> list[int]:
    """Doubling from FIRST_LENGTH up to the longest prompt that leaves room for the answer, plus the chunk boundary
    and a length just past it (an eighth of a chunk, at least 32 tokens) where they fit; none under `shortest`."""
    longest = max_context - answer_tokens
    lengths = []
    length = FIRST_LENGTH
    while length <= longest:
        lengths.append(length)
        length *= 2
    if not lengths or lengths[-1] != longest:
        lengths.append(longest)  # the full context is the cell users ask about
    lengths += [n for n in (chunk, chunk + max(32, chunk // 8)) if n <= longest]
    return sorted(set(n for n in lengths if n >= shortest))


def default_depths(steps: int = DEPTH_STEPS) -> list[float]:
    return [round(i / (steps - 1), 4) for i in range(steps)]


def answer_key(text: str) -> str | None:
    """The first run of digits in the engine's answer (None when it wrote no digit)."""
    found = re.search(r"\d+", text)
    return found.group(0) if found else None


class Prompts:
    """Builds each trial's prompt ids from the haystack's tokens and the fixed pieces (see the module docstring)."""

    def __init__(self, tokenizer, haystack_text: str):
        self.tokenizer = tokenizer
        self.haystack = tokenizer.encode(haystack_text, add_special_tokens=False)
        if len(self.haystack) < 64:
            raise ValueError(f"the haystack has {len(self.haystack)} tokens; give a text of at least 64")
        self.intro = tokenizer.encode(INTRO)  # the tokenizer's own special tokens (begin of text) lead the prompt
        self.question = tokenizer.encode(QUESTION, add_special_tokens=False)

    def needle(self, key: str) -> list[int]:
        return self.tokenizer.encode(NEEDLE.format(key=key), add_special_tokens=False)

    def filler(self, length: int, key: str) -> int:
        return length - len(self.intro) - len(self.needle(key)) - len(self.question)

    def build(self, trial: Trial) -> list[int]:
        needle = self.needle(trial.key)
        filler = self.filler(trial.length, trial.key)
        if filler < 0:
            raise ValueError(f"a prompt of {trial.length} tokens cannot hold the intro, needle and question")
        stream = [self.haystack[(trial.haystack_offset + i) % len(self.haystack)] for i in range(filler)]
        at = round(trial.depth * filler)
        ids = self.intro + stream[:at] + needle + stream[at:] + self.question
        assert len(ids) == trial.length and trial.needle_at == len(self.intro) + at
        return ids


def plan_trials(prompts: Prompts, lengths, depths, trials: int, seed: int = SEED) -> list[Trial]:
    rng = np.random.default_rng(seed)
    planned = []
    for length in lengths:
        for depth in depths:
            for t in range(trials):
                key = str(int(rng.integers(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS)))
                offset = int(rng.integers(0, len(prompts.haystack)))
                filler = prompts.filler(length, key)
                if filler < 0:
                    raise ValueError(
                        f"length {length} is too short for the intro, needle and question "
                        f"({length - filler} tokens); use lengths of at least {length - filler + 1}"
                    )
                planned.append(Trial(length, depth, t, key, offset, len(prompts.intro) + round(depth * filler)))
    return planned


def haystack_path(manifest, haystack: str | Path | None) -> Path:
    if haystack is not None:
        return Path(haystack)
    from llama4_deploy.quality.evaluate import default_text

    try:
        return default_text(manifest)
    except ValueError:
        raise ValueError(
            f"bundle {manifest.name} was not built from a checkpoint with a held-out sample; pass --haystack FILE"
        ) from None


def sweep(
    bundle: str | Path,
    haystack: str | Path | None = None,
    lengths: Sequence[int] | None = None,
    depth_steps: int = DEPTH_STEPS,
    trials: int = TRIALS,
    threads: int | None = None,
    progress: bool = True,
    seed: int = SEED,
    tokenizer_of: str | Path | None = None,
) -> Sweep:
    """Run every trial of the grid on the bundle (greedy, batched up to the engine's max_batch rows).
    `tokenizer_of`: build the prompts with this bundle's tokenizer (--compare: both bundles see the same ids)."""
    from tqdm import tqdm

    manifest = read_manifest(Path(bundle))
    if depth_steps < 2:
        raise ValueError(f"depth steps is {depth_steps}; it must be at least 2 (0% and 100%)")
    if trials < 1:
        raise ValueError(f"trials is {trials}; it must be at least 1")
    source = haystack_path(manifest, haystack)
    text, _ = read_utf8(source, "haystack file")
    tokenizer = load_tokenizer(read_manifest(Path(tokenizer_of)) if tokenizer_of else manifest)
    prompts = Prompts(tokenizer, text)
    answer_tokens = ANSWER_TOKENS
    chunk = manifest.model["attention_chunk_size"]
    if lengths is None:
        # the fixed pieces and at least 32 filler tokens
        shortest = len(prompts.intro) + len(prompts.needle("9" * KEY_DIGITS)) + len(prompts.question) + 32
        lengths = default_lengths(manifest.max_context, chunk, answer_tokens, shortest)
    lengths = sorted(set(int(n) for n in lengths))
    too_long = [n for n in lengths if n + answer_tokens > manifest.max_context]
    if not lengths or too_long:
        raise ValueError(
            f"lengths {too_long or lengths} leave no room for the {answer_tokens}-token answer in the bundle's "
            f"context of {manifest.max_context}"
        )
    depths = default_depths(depth_steps)
    planned = plan_trials(prompts, lengths, depths, trials, seed)
    model = manifest.model
    tuning = bool(model.get("attn_temperature_tuning")) and not all(model["rope_layers"])
    with (
        load(bundle, threads=threads) as engine,
        tqdm(total=len(planned), desc=f"needle {Path(bundle).name}", disable=not progress) as bar,
    ):
        for start in range(0, len(planned), engine.max_batch):
            group = planned[start : start + engine.max_batch]
            out = engine.generate([prompts.build(t) for t in group], answer_tokens, temperature=0.0)
            for trial, tokens in zip(group, out.tokens):
                trial.answer = tokenizer.decode([t for t in tokens if t not in engine.manifest.eos_token_ids])
                trial.correct = answer_key(trial.answer) == trial.key
            bar.update(len(group))
    return Sweep(str(bundle), str(source), lengths, depths, planned, chunk, manifest.max_context, tuning)


def heatmap(sweeps: Sequence[Sweep], path: str | Path, titles: Sequence[str] | None = None) -> Path:
    """The published needle plot: accuracy by context length (x) and needle depth (y), green = retrieved; one panel
    per sweep, and their difference when there are two (--compare)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt

    panels = [
        (s.accuracy().T, titles[i] if titles else Path(s.bundle).name, "RdYlGn", 0, 1) for i, s in enumerate(sweeps)
    ]
    if len(sweeps) == 2:
        panels.append((sweeps[1].accuracy().T - sweeps[0].accuracy().T, "difference (second - first)", "RdBu", -1, 1))
    fig, axes = plt.subplots(1, len(panels), figsize=(1.6 + 0.7 * len(sweeps[0].lengths) * len(panels) + 1.5, 4.2))
    axes = np.atleast_1d(axes)
    for ax, (grid, title, cmap, low, high) in zip(axes, panels):
        image = ax.imshow(grid, cmap=cmap, vmin=low, vmax=high, aspect="auto", origin="upper")
        lengths, depths = sweeps[0].lengths, sweeps[0].depths
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(title, fontsize=9)
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                ax.text(j, i, f"{grid[i, j] * 100:.0f}", ha="center", va="center", fontsize=7)
        chunk = sweeps[0].chunk
        boundary = [j for j, n in enumerate(lengths) if n > chunk]
        if boundary and boundary[0] > 0:  # a line between the last length within one chunk and the first past it
            ax.axvline(boundary[0] - 0.5, color="black", linestyle="--", linewidth=1)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_outputs(sweeps: Sequence[Sweep], out: Path, write_png: Callable[[Path, Callable], Path]) -> list[Path]:
    """needle.json (every trial of every sweep) and needle.png (the heatmap) in `out`, each written whole."""
    out.mkdir(parents=True, exist_ok=True)
    record = out / "needle.json"
    partial = out / ".needle.json.partial"
    partial.write_text(json.dumps([s.record() for s in sweeps], indent=1))
    partial.replace(record)
    png = write_png(out / "needle.png", lambda p: heatmap(sweeps, p))
    return [record, png]
