"""Perplexity of a bundle on text, through the runtime's prefill path (`Engine.score`).

The text is encoded with the bundle's tokenizer.json and cut into non-overlapping windows of the
bundle's context (the last partial window dropped, as in training); each window is scored from a
fresh cache, and every token after a window's first is predicted from the ones before it.
Perplexity = exp(mean negative log-likelihood). Without a text, the held-out sample shipped with
the trained checkpoint the bundle was built from is used.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np

from llama4_deploy.runtime import load, read_manifest
from llama4_deploy.runtime.paths import read_utf8
from llama4_deploy.runtime.tokenizer import load_tokenizer

HELD_OUT_SAMPLE = "held-out-sample.txt"  # written next to the weights by tools.train


@dataclasses.dataclass
class Evaluation:
    text: Path
    perplexity: float
    tokens: int  # tokens predicted
    windows: int
    window: int  # tokens per window
    seconds: float
    replaced_bytes: int = 0  # undecodable bytes of the text read as U+FFFD (errors="replace")

    @property
    def tokens_per_s(self) -> float:
        return (self.tokens + self.windows) / self.seconds  # every token of a window is run

    def summary(self) -> str:
        return (
            f"perplexity {self.perplexity:.3f} on {self.text.name} ({self.tokens} predicted tokens, "
            f"{self.windows} windows of {self.window}); {self.tokens_per_s:,.0f} tokens/s through the prefill path"
            + (f"; {self.replaced_bytes} undecodable bytes of the text read as U+FFFD" if self.replaced_bytes else "")
        )


def default_text(manifest) -> Path:
    """The held-out sample shipped next to the checkpoint the bundle was built from."""
    source = manifest.raw.get("source") or {}
    if source.get("kind") == "checkpoint":
        path = Path(source["path"]) / HELD_OUT_SAMPLE
        if path.is_file():
            return path
    raise ValueError(
        f"bundle {manifest.name} was not built from a checkpoint with a {HELD_OUT_SAMPLE}; pass --text FILE"
    )


def log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum of -log p(target) over rows of logits [T, V] (float64, stable)."""
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
    return float((log_z - logits[np.arange(len(targets)), targets]).sum())


def evaluate(
    bundle: str | Path,
    text: str | Path | None = None,
    window: int | None = None,
    max_windows: int | None = None,
    threads: int | None = None,
    errors: str = "strict",
) -> Evaluation:
    """`errors`: "strict" refuses a text that is not valid UTF-8 (a perplexity of random bytes means nothing);
    "replace" reads each undecodable byte as U+FFFD and the result says how many there were."""
    if errors not in ("strict", "replace"):
        raise ValueError(f"errors is {errors!r}; it must be 'strict' or 'replace'")
    manifest = read_manifest(Path(bundle))
    source = text if text is not None else default_text(manifest)
    content, replaced = read_utf8(
        source, "text file", replace=errors == "replace", hint="--errors replace reads each undecodable byte as U+FFFD"
    )
    path = Path(source)
    tokenizer = load_tokenizer(manifest)
    ids = np.array(tokenizer.encode(content), dtype=np.int64)
    window = window or manifest.max_context
    if window < 2 or window > manifest.max_context:
        raise ValueError(f"window is {window}; it must be in [2, the bundle's context of {manifest.max_context}]")
    count = len(ids) // window
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise ValueError(f"{path} has {len(ids)} tokens, fewer than one window of {window}")
    nll, predicted = 0.0, 0
    with load(bundle, threads=threads) as engine:
        start = time.perf_counter()  # scoring only, not session creation
        for w in range(count):
            chunk = ids[w * window : (w + 1) * window]
            logits = engine.score(chunk.tolist(), mode="prefill")  # [window, V]
            nll += log_softmax_nll(logits[:-1], chunk[1:])
            predicted += window - 1
        seconds = time.perf_counter() - start
    return Evaluation(path, math.exp(nll / predicted), predicted, count, window, seconds, replaced)
