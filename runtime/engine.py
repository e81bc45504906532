"""Generation over a bundle's engine: prefill, decode_step, sample, generate, score.

Letters in shape comments: B batch rows, T new tokens this step, K kv heads, S cache slots,
D head_dim, V vocab. A position of -1 marks a padded token (the engine ignores it as a key and
the runtime never writes it into the cache).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from llama4_deploy.runtime.bundle import Manifest, read_manifest
from llama4_deploy.runtime.onnxruntime_backend import OnnxRuntimeRunner

PAD_POSITION = -1
MIN_CONTEXT_BUCKET = 16


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt (a stop token, when hit, is the last one)
    logits: list[np.ndarray] | None = None  # per prompt [new tokens, V]: what each token was chosen from
    steps: int = 0  # engine calls made
    overflow_reruns: int = 0  # steps rerun on the exact engine after a capacity overflow


class KVCache:
    """Cache buffers of one batch, allocated once. Global layers: slot j holds position j.
    Chunked layers: a ring of C slots, position p in slot p mod C."""

    def __init__(self, manifest: Manifest, batch: int):
        model = manifest.model
        K, D = model["num_kv_heads"], model["head_dim"]
        self.context = manifest.max_context
        self.keys: dict[int, np.ndarray] = {}  # [B, K, S, D]
        self.values: dict[int, np.ndarray] = {}
        # per layer: (index, ring size or 0 for a global layer, feed names, output names)
        self._slots: list[tuple[int, int, tuple[str, str], tuple[str, str]]] = []
        for layer in manifest.layers:
            i, ring = layer.index, layer.slots if layer.attention == "chunked" else 0
            self.keys[i] = np.zeros((batch, K, ring or self.context, D), dtype=np.float32)
            self.values[i] = np.zeros((batch, K, ring or self.context, D), dtype=np.float32)
            self._slots.append((i, ring, (f"past_key.{i}", f"past_value.{i}"), (f"present_key.{i}", f"present_value.{i}")))
        self.lengths = np.zeros(batch, dtype=np.int64)  # [B] tokens already cached per row

    def context_bucket(self) -> int:
        """Global-cache slots to hand the engine: a power of two covering every row, so the
        attention cost follows the filled context rather than the maximum."""
        needed = max(int(self.lengths.max()), 1)
        bucket = MIN_CONTEXT_BUCKET
        while bucket < needed:
            bucket *= 2
        return min(bucket, self.context)

    def feeds(self) -> dict[str, np.ndarray]:
        bucket = self.context_bucket()
        feeds = {}
        for index, ring, (key_name, value_name), _ in self._slots:
            key, value = self.keys[index], self.values[index]
            if not ring:
                key, value = np.ascontiguousarray(key[:, :, :bucket]), np.ascontiguousarray(value[:, :, :bucket])
            feeds[key_name] = key
            feeds[value_name] = value
        return feeds

    def write(self, outputs: dict[str, np.ndarray], positions: np.ndarray) -> None:
        """Store the step's new keys/values ([B, K, T, D]) at their slots; advance lengths."""
        if positions.shape[1] == 1:
            return self._write_one(outputs, positions[:, 0])
        rows, steps = np.nonzero(positions >= 0)
        slots = positions[rows, steps]
        self._check_room(slots)
        new_lengths = self.lengths.copy()
        np.maximum.at(new_lengths, rows, slots + 1)
        for index, ring, _, (key_name, value_name) in self._slots:
            key, value = outputs[key_name], outputs[value_name]
            if ring:
                # a step longer than the ring only keeps each row's newest C positions
                keep = slots >= new_lengths[rows] - ring
                r, t, s = rows[keep], steps[keep], slots[keep] % ring
            else:
                r, t, s = rows, steps, slots
            self.keys[index][r, :, s] = key[r, :, t]
            self.values[index][r, :, s] = value[r, :, t]
        self.lengths = new_lengths

    def _check_room(self, slots: np.ndarray) -> None:
        if slots.size and slots.max() >= self.context:
            raise ValueError(f"position {int(slots.max())} is beyond the bundle's context of {self.context} tokens")

    def _write_one(self, outputs: dict[str, np.ndarray], positions: np.ndarray) -> None:
        """The decode case: at most one new token per row."""
        rows = np.flatnonzero(positions >= 0)
        slots = positions[rows]
        self._check_room(slots)
        if len(rows) <= 2:  # plain indexing per row: ~5x cheaper than fancy indexing for one row
            for row, slot in zip(rows.tolist(), slots.tolist()):
                for index, ring, _, (key_name, value_name) in self._slots:
                    at = slot % ring if ring else slot
                    self.keys[index][row, :, at] = outputs[key_name][row, :, 0]
                    self.values[index][row, :, at] = outputs[value_name][row, :, 0]
                self.lengths[row] = max(self.lengths[row], slot + 1)
            return
        for index, ring, _, (key_name, value_name) in self._slots:
            at = slots % ring if ring else slots
            self.keys[index][rows, :, at] = outputs[key_name][rows, :, 0]
            self.values[index][rows, :, at] = outputs[value_name][rows, :, 0]
        self.lengths[rows] = np.maximum(self.lengths[rows], slots + 1)


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


class Engine:
    """A loaded bundle. `generate` for text, `score` for per-position logits."""

    def __init__(self, manifest: Manifest, threads: int | None = None):
        self.manifest = manifest
        engine = manifest.engine
        if engine["backend"] != "onnxruntime":
            raise ValueError(f"bundle {manifest.name} targets {engine['backend']}; this runtime runs onnxruntime bundles")
        if engine.get("compute_dtype") == "bfloat16":
            raise ValueError(f"bundle {manifest.name} computes in bfloat16, which ONNX Runtime's CPU cannot run; "
                             "rebuild it with --precision fp16 or fp32 to run it here (bf16 bundles are for TensorRT)")
        self.graphs = engine["graphs"]  # role (prefill, decode, exact) -> graph record
        files = dict.fromkeys(graph["file"] for graph in self.graphs.values())
        # ONNX Runtime's threads spin after each run; a second spinning session run right after
        # the first slows it ~2x on 2 cores. The rerun-only (exact) graph does not spin.
        steady = {graph["file"] for role, graph in self.graphs.items() if role != "exact"}
        self.runners = {f: OnnxRuntimeRunner(manifest.path / f, threads=threads, spin=f in steady).activate()
                        for f in files}
        self.vocab_size = manifest.vocab_size
        self.max_batch = manifest.profiles["max_batch"]
        self.prefill_tokens = manifest.profiles["prefill_tokens"]
        self.steps = 0
        self.overflow_reruns = 0

    def close(self) -> None:
        for runner in self.runners.values():
            runner.deactivate()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- checks ---------------------------------------------------------------------------------
    def _check_prompt(self, ids: Sequence[int], new_tokens: int, what: str = "prompt") -> list[int]:
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError(f"{what} is empty; give at least one token id")
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"{what} has token id {bad[0]}, outside the vocabulary [0, {self.vocab_size})")
        if len(ids) + new_tokens > self.manifest.max_context:
            raise ValueError(
                f"{what} of {len(ids)} tokens plus {new_tokens} new ones exceeds the bundle's context of "
                f"{self.manifest.max_context} tokens"
            )
        return ids

    # -- steps ----------------------------------------------------------------------------------
    def run_step(self, cache: KVCache, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One engine call on ids/positions [B, T]; returns logits [B, T, V] and updates the cache.

        A capacity-limited graph reports `moe_overflow`; the step is then rerun on the exact
        graph before anything is written, so results never depend on capacity."""
        feeds = {"input_ids": ids, "position_ids": positions, "past_lengths": cache.lengths.copy(), **cache.feeds()}
        role = "decode" if ids.shape[1] == 1 else "prefill"
        outputs = self.runners[self.graphs[role]["file"]].infer(feeds)
        if self.graphs[role].get("reports_overflow") and outputs["moe_overflow"].any():
            outputs = self.runners[self.graphs["exact"]["file"]].infer(feeds)
            self.overflow_reruns += 1
        cache.write(outputs, positions)
        self.steps += 1
        return outputs["logits"]

    def prefill(self, cache: KVCache, prompts: list[list[int]], keep_all: bool = False):
        """Feed prompts in steps of the prefill profile; rows may differ in length.

        Returns the logits [B, V] at each prompt's last token, and, with keep_all, the logits at
        every position of each prompt.
        """
        batch = len(prompts)
        done = [0] * batch
        last = np.zeros((batch, self.vocab_size), dtype=np.float32)
        every = [[] for _ in prompts]
        while any(done[b] < len(prompts[b]) for b in range(batch)):
            take = [min(self.prefill_tokens, len(prompts[b]) - done[b]) for b in range(batch)]
            width = max(take)
            ids = np.zeros((batch, width), dtype=np.int64)
            positions = np.full((batch, width), PAD_POSITION, dtype=np.int64)
            for b in range(batch):
                ids[b, : take[b]] = prompts[b][done[b] : done[b] + take[b]]
                positions[b, : take[b]] = np.arange(done[b], done[b] + take[b])
            logits = self.run_step(cache, ids, positions)
            for b in range(batch):
                if take[b]:
                    if keep_all:
                        every[b].append(logits[b, : take[b]])
                    done[b] += take[b]
                    if done[b] == len(prompts[b]):
                        last[b] = logits[b, take[b] - 1]
        return last, ([np.concatenate(chunks) for chunks in every] if keep_all else None)

    def decode_step(self, cache: KVCache, tokens: np.ndarray, active: np.ndarray) -> np.ndarray:
        """One new token per active row; inactive rows are padding. Returns logits [B, V]."""
        positions = np.where(active, cache.lengths, PAD_POSITION)[:, None]
        return self.run_step(cache, tokens.astype(np.int64)[:, None], positions)[:, 0]

    # -- public API -----------------------------------------------------------------------------
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_tokens: Sequence[int] | None = None,
        return_logits: bool = False,
    ) -> Generation:
        if not prompts:
            raise ValueError("no prompts given; pass a list of token-id lists")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens is {max_new_tokens}; it must be at least 1")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p is {top_p}; it must be in (0, 1]")
        prompts = [self._check_prompt(p, max_new_tokens, f"prompt {i}") for i, p in enumerate(prompts)]
        stop = set(self.manifest.eos_token_ids if stop_tokens is None else stop_tokens)
        rng = np.random.default_rng(seed)
        tokens: list[list[int]] = []
        logits: list[np.ndarray] = []
        steps_before, reruns_before = self.steps, self.overflow_reruns
        for start in range(0, len(prompts), self.max_batch):
            group = prompts[start : start + self.max_batch]
            cache = KVCache(self.manifest, len(group))
            step_logits, _ = self.prefill(cache, group)
            active = np.ones(len(group), dtype=bool)
            new = [[] for _ in group]
            chosen_from = [[] for _ in group]
            for step in range(max_new_tokens):
                chosen = sample(step_logits, temperature, top_p, rng)
                for b in np.flatnonzero(active):
                    new[b].append(int(chosen[b]))
                    chosen_from[b].append(step_logits[b].copy())
                    if int(chosen[b]) in stop:
                        active[b] = False
                if step + 1 == max_new_tokens or not active.any():
                    break
                step_logits = self.decode_step(cache, np.where(active, chosen, 0), active)
            tokens.extend(new)
            logits.extend(np.stack(rows) for rows in chosen_from)
        return Generation(tokens, logits if return_logits else None, self.steps - steps_before,
                          self.overflow_reruns - reruns_before)

    def score(self, ids: Sequence[int], mode: str = "prefill") -> np.ndarray:
        """Logits [len(ids), V] at every position, through the prefill path (in chunks of the
        prefill profile) or the decode path (one token per step)."""
        ids = self._check_prompt(ids, 0, "sequence")
        cache = KVCache(self.manifest, 1)
        if mode == "prefill":
            _, every = self.prefill(cache, [ids], keep_all=True)
            return every[0]
        if mode == "decode":
            rows = [self.decode_step(cache, np.array([token]), np.array([True]))[0] for token in ids]
            return np.stack(rows)
        raise ValueError(f"mode is {mode!r}; use 'prefill' or 'decode'")


def load(bundle_dir: str | os.PathLike, threads: int | None = None) -> Engine:
    """Load a bundle built by `llama4-deploy build`."""
    return Engine(read_manifest(Path(bundle_dir)), threads=threads)
