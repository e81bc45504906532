"""KV cache of one batch: runtime-owned buffers sized by the filled context, shared by every backend.

Letters: B batch rows, K kv heads, S slots handed to the engine, D head_dim, T new tokens, C
attention_chunk_size.

Layout (docs/engine-abi.md): a global layer's slot j holds position j; a chunked layer's ring
holds position p in slot p mod C.

Who owns what, per step:
- The cache owns the buffers and the bookkeeping (tokens cached per row, capacity). `feeds()` hands
  the runner every layer's whole buffer, [B, K, S, D]: the runner reads it and must not keep it.
  The runner returns the step's new keys/values, [B, K, T, D]; `write()` stores them in place.
- Capacity follows the filled context, not the maximum. S is one bucket for every layer, covering
  the longest row (`context_bucket`: 16, 32, ... 256, then steps of 1.25x at most, never beyond the
  bundle's max_context); a chunked layer's ring has min(C, S) slots. While S < C no cached position reaches S, so a
  short ring is exact; from the moment a row passes C its ring is the full C slots and wraps.
- A buffer is exactly the array the engine is fed, so no step copies the cache; ONNX Runtime reads
  a contiguous host array in place (a slice of a larger buffer would be copied on every step). When
  a write needs more slots than the bucket, every buffer is reallocated at the next bucket and its
  filled slots copied: geometric growth, so amortized O(1) per token (25 reallocations from 0 to
  8192 tokens).
- The gqa attention form writes the new keys/values itself, into the buffers it is fed (bound as the graph's
  present outputs too): the engine asks `step_width` how many tokens the next step may take, `reserve_step` grows
  the buffers before it, and `advance` counts the tokens after it; `write` is not used.
- Buffer operations (allocate, grow, scatter new rows) go through a storage object. `HostStorage`
  keeps numpy arrays for ONNX Runtime on the CPU; a GPU backend supplies device arrays with the same
  three operations, so the cache never leaves the device and only the small index arrays computed
  here (rows, slots, steps) cross to it. A pipeline on several GPUs passes one storage per layer
  (layer index -> storage), so each layer's buffers live on its stage's device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from llama4_deploy.runtime import abi

MIN_BUCKET = 16
FINE_ABOVE = 256  # past this, buckets grow by at most 1.25x instead of doubling


class CacheStorage(Protocol):
    def allocate(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        """A zero-filled buffer [B, K, S, D] (zeros: masked slots must hold finite numbers)."""

    def grow(self, buffer: Any, slots: int) -> Any:
        """A zero-filled buffer with `slots` slots whose first slots are a copy of `buffer`'s."""

    def scatter(self, buffer: Any, rows: np.ndarray, slots: np.ndarray, new: Any, steps: np.ndarray) -> None:
        """buffer[rows[i], :, slots[i]] = new[rows[i], :, steps[i]] for every i, in place."""


class HostStorage:
    """numpy buffers in host memory (ONNX Runtime's CPU provider reads them in place)."""

    def allocate(self, shape, dtype):
        return np.zeros(shape, dtype=dtype)

    def grow(self, buffer, slots):
        grown = np.zeros(buffer.shape[:2] + (slots,) + buffer.shape[3:], dtype=buffer.dtype)
        grown[:, :, : buffer.shape[2]] = buffer
        return grown

    def copy_row(self, buffer, source: int, target: int) -> None:
        """buffer[target] = buffer[source], in place (one prompt's cache shared by several samples)."""
        buffer[target] = buffer[source]

    def scatter(self, buffer, rows, slots, new, steps):
        if len(rows) <= 2:  # plain indexing per row beats fancy indexing for a row or two (docs/benchmarks.md)
            for row, slot, step in zip(rows.tolist(), slots.tolist(), steps.tolist()):
                buffer[row, :, slot] = new[row, :, step]
            return
        buffer[rows, :, slots] = new[rows, :, steps]


def cache_dtype(name: str) -> np.dtype:
    """numpy dtype of a manifest's cache_dtype; bfloat16 (TensorRT bundles) comes from ml_dtypes."""
    if name == "bfloat16":
        import ml_dtypes  # deferred: not a runtime dependency (the build and tensorrt extras bring it)

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def context_bucket(tokens: int, max_context: int) -> int:
    """Slots that hold `tokens` cached positions, at least 16, at most max_context: powers of two up
    to 256, then multiples of an eighth of the next power of two (5120 for 4097 tokens, not 8192).
    Each bucket is at most 1.25x the one before, so at most a fifth of the slots the engine reads
    are empty, and growing stays amortized O(1) per token."""
    power = MIN_BUCKET
    while power < tokens:
        power *= 2
    if power > FINE_ABOVE:
        step = power // 8
        power = -(-tokens // step) * step
    return min(power, max_context)


class _Layout:
    """A KVCache's current set of buffers, as an object a runner can hold weakly (KVCache.binding_key)."""


@dataclasses.dataclass(frozen=True)
class _Layer:
    index: int
    ring: int  # C for a chunked layer, 0 for a global one
    feeds: tuple[str, str]  # past_key.l, past_value.l
    outputs: tuple[str, str]  # present_key.l, present_value.l


class KVCache:
    """Cache buffers of one batch of `batch` rows; see the module docstring for the contract."""

    def __init__(self, manifest, batch: int, storage: CacheStorage | Mapping[int, CacheStorage] | None = None):
        model = manifest.model
        per_layer = storage if isinstance(storage, Mapping) else None
        self.storage = HostStorage() if storage is None or per_layer is not None else storage
        self.max_context = manifest.max_context
        self.dtype = cache_dtype(manifest.engine.get("cache_dtype", "float32"))
        self._shape = (batch, model["num_kv_heads"], model["head_dim"])
        self._layers = [
            _Layer(
                layer.index,
                layer.slots if layer.attention == "chunked" else 0,
                (abi.past_key(layer.index), abi.past_value(layer.index)),
                (abi.present_key(layer.index), abi.present_value(layer.index)),
            )
            for layer in manifest.layers
        ]
        # layer -> where its buffers live (one storage for all, or each layer's stage's device)
        self._storage_of = {
            layer.index: per_layer[layer.index] if per_layer is not None else self.storage for layer in self._layers
        }
        self.lengths = np.zeros(batch, dtype=np.int64)  # [B] tokens already cached per row
        self.bucket = context_bucket(0, self.max_context)
        self.keys: dict[int, Any] = {}  # layer -> [B, K, S, D]
        self.values: dict[int, Any] = {}
        for layer in self._layers:
            B, K, D = self._shape
            shape = (B, K, self._slots(layer), D)
            self.keys[layer.index] = self._storage_of[layer.index].allocate(shape, self.dtype)
            self.values[layer.index] = self._storage_of[layer.index].allocate(shape, self.dtype)
        self.grown = 0  # reallocations so far
        self._layout = _Layout()  # replaced whenever a buffer is reallocated (binding_key)

    def _slots(self, layer: _Layer, bucket: int | None = None) -> int:
        bucket = self.bucket if bucket is None else bucket
        return min(layer.ring, bucket) if layer.ring else bucket

    def binding_key(self, rows: int | None = None) -> tuple | None:
        """What identifies the buffers `feeds()` hands out, for a runner that keeps them bound from step to step
        (OnnxRuntimeRunner.holds): an object that lives while they do and is replaced whenever one is reallocated,
        and the rows stepped (`rows`: the leading rows only). None: the buffers are not stable (a subclass whose
        feeds are copies)."""
        return (self._layout, len(self.lengths) if rows is None else rows)

    def feeds(self) -> dict[str, Any]:
        """Every layer's whole buffer by input name: past_key.l / past_value.l [B, K, S, D]."""
        feeds = {}
        for layer in self._layers:
            feeds[layer.feeds[0]] = self.keys[layer.index]
            feeds[layer.feeds[1]] = self.values[layer.index]
        return feeds

    def _reserve(self, tokens: int) -> None:
        """Grow every buffer to the bucket that holds `tokens` cached positions."""
        bucket = context_bucket(tokens, self.max_context)
        if bucket <= self.bucket:
            return
        for layer in self._layers:
            slots = self._slots(layer, bucket)
            if slots != self._slots(layer):
                storage = self._storage_of[layer.index]
                self.keys[layer.index] = storage.grow(self.keys[layer.index], slots)
                self.values[layer.index] = storage.grow(self.values[layer.index], slots)
        self.bucket = bucket
        self.grown += 1
        self._layout = _Layout()

    def _real_positions(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rows, columns and positions of a step's real tokens (positions [B, T], -1 for padding), each within the
        bundle's context."""
        rows, steps = np.nonzero(positions >= 0)
        positions = positions[rows, steps]
        if len(rows) and positions.max() >= self.max_context:
            raise ValueError(
                f"position {int(positions.max())} is beyond the bundle's context of {self.max_context} tokens"
            )
        return rows, steps, positions

    def write(self, outputs: dict[str, Any], positions: np.ndarray) -> None:
        """Store the step's new keys/values (present_*.l [B, K, T, D]) at their slots and advance
        the lengths; positions [B, T] with -1 for padding, as fed to the engine."""
        rows, steps, positions = self._real_positions(positions)
        if not len(rows):
            return
        new_lengths = self.lengths.copy()
        np.maximum.at(new_lengths, rows, positions + 1)
        self._reserve(int(new_lengths.max()))
        for layer in self._layers:
            r, t, p = rows, steps, positions
            if layer.ring:
                if positions.shape[0] > layer.ring:  # a row may bring more than C tokens: keep its newest C
                    keep = positions >= new_lengths[rows] - layer.ring
                    r, t, p = rows[keep], steps[keep], positions[keep]
                p = p % layer.ring
            storage = self._storage_of[layer.index]
            storage.scatter(self.keys[layer.index], r, p, outputs[layer.outputs[0]], t)
            storage.scatter(self.values[layer.index], r, p, outputs[layer.outputs[1]], t)
        self.lengths = new_lengths

    # -- written in place by the engine (the gqa attention form, graphs/lower_attention_gqa.py) ------------------
    def step_width(self, tokens: int, idle: np.ndarray, lengths: np.ndarray | None = None) -> int:
        """How many of the next `tokens` columns one in-place step may take: every row's buffer must hold its past
        P_b plus the whole padded step (the kernel's contract), where a chunked layer's P_b is the row's place in its
        current chunk and an idle row (`idle` [B]: no real token left in the step) counts at least 1. So a step that
        would cross a chunk boundary (or pass the bundle's context) is cut there. `lengths`: the rows stepped
        (default: all)."""
        lengths = self.lengths if lengths is None else lengths
        floor = idle.astype(lengths.dtype)  # an idle row's past is at least 1
        width = min(tokens, self.max_context - int(np.maximum(lengths, floor).max()))
        for ring in {layer.ring for layer in self._layers if layer.ring}:
            width = min(width, ring - int(np.maximum(lengths % ring, floor).max()))
        if width < 1:
            raise ValueError(f"a row of this cache is full (its context of {self.max_context} tokens reached)")
        return width

    def reserve_step(self, width: int, idle: np.ndarray, lengths: np.ndarray | None = None) -> None:
        """Grow the buffers so an in-place step of `width` columns fits every row (see step_width)."""
        lengths = self.lengths if lengths is None else lengths
        self._reserve(int(np.maximum(lengths, idle.astype(lengths.dtype)).max()) + width)

    def advance(self, positions: np.ndarray) -> None:
        """Count the step's real tokens (positions [B, T], -1 for padding) whose keys/values the engine wrote in
        place; their slots were reserved by reserve_step."""
        rows, steps, positions = self._real_positions(positions)
        if not len(rows):
            return
        np.maximum.at(self.lengths, rows, positions + 1)

    @property
    def can_copy_rows(self) -> bool:
        return all(hasattr(storage, "copy_row") for storage in self._storage_of.values())

    def copy_row(self, source: int, target: int) -> None:
        """Make row `target` hold what row `source` holds (its length and every layer's slots): n samples of
        one prompt share its prefill. Only where every storage can copy rows (`can_copy_rows`)."""
        for layer in self._layers:
            storage = self._storage_of[layer.index]
            storage.copy_row(self.keys[layer.index], source, target)
            storage.copy_row(self.values[layer.index], source, target)
        self.lengths[target] = self.lengths[source]

    def reset_row(self, row: int) -> None:
        """Empty one row for a new sequence (continuous batching). Its stale slots stay in the buffers
        but are never read: the engine trusts only positions below the row's length, now 0."""
        if not 0 <= row < len(self.lengths):
            raise ValueError(f"row {row} is outside this cache's {len(self.lengths)} rows")
        self.lengths[row] = 0

    def kv_bytes_read(self) -> int:
        """Bytes of cache the engine is handed per step now (keys and values, every layer)."""
        B, K, D = self._shape
        return sum(2 * B * K * self._slots(layer) * D * self.dtype.itemsize for layer in self._layers)


@dataclasses.dataclass(frozen=True)
class CacheMemory:
    """What a bundle's cache costs: bytes per cached token by layer kind, and at the limits."""

    bytes_per_token: dict[str, int]  # layer kind -> bytes per token per row, all layers of the kind
    chunk: int
    max_context: int
    max_batch: int

    @property
    def at_max(self) -> int:
        """Bytes of cache at the bundle's max_context and max_batch (rings capped at C)."""
        chunked = self.bytes_per_token.get("chunked", 0) * min(self.chunk, self.max_context)
        glob = self.bytes_per_token.get("global", 0) * self.max_context
        return (chunked + glob) * self.max_batch

    def __str__(self) -> str:
        kinds = ", ".join(f"{kind} {size / 1024:.1f} KiB" for kind, size in self.bytes_per_token.items())
        return (
            f"KV cache per token per row: {kinds} (chunked layers stop growing at {self.chunk} tokens); "
            f"{self.at_max / 2**20:.1f} MiB at max context {self.max_context} x batch {self.max_batch}"
        )


def cache_memory(manifest) -> CacheMemory:
    model = manifest.model
    itemsize = cache_dtype(manifest.engine.get("cache_dtype", "float32")).itemsize
    per_layer = 2 * model["num_kv_heads"] * model["head_dim"] * itemsize  # key + value of one token
    kinds: dict[str, int] = {}
    for layer in manifest.layers:
        kinds[layer.attention] = kinds.get(layer.attention, 0) + per_layer
    return CacheMemory(kinds, model["attention_chunk_size"], manifest.max_context, manifest.profiles["max_batch"])
