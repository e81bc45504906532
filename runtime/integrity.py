"""Bundle integrity: file hashes, the weight layout each graph expects, manifest <-> graph I/O.

Three checks, each refusing in one sentence (BundleError):
- `check_files`: every file the manifest lists has its recorded size and SHA-256 (read in
  parallel, in large blocks; a file over 256 MiB also records the SHA-256 of each 256 MiB part,
  so its parts are checked in parallel instead of one thread reading, say, 400 GB of weights). The build records
  them (`hash_files`); manifest.json itself is not listed. `load(..., verify_files=False)` or
  LLAMA4_DEPLOY_VERIFY_FILES=0 skips this one.
- `check_layout`: a graph carries, in its metadata_props, the fingerprint of the weights.data
  layout it was saved against (name, offset, length, dtype, shape of every external tensor);
  it must equal the manifest's. A graph copied from another bundle is refused even when the
  hashes are skipped, because reading it is free: ONNX Runtime reports it at session creation.
- `check_graph_io`: the graph's declared inputs and outputs (names, dtypes, cache dims per
  layer) agree with the manifest's layers, so the runtime never trusts the manifest alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from llama4_deploy.runtime import abi
from llama4_deploy.runtime.bundle import BundleError, Manifest, StageRecord

log = logging.getLogger(__name__)

LAYOUT_KEY = "llama4_deploy.weights_layout"  # metadata_props entry of every graph
# the chunk a graph's masks were traced with: ring inputs are a dynamic dim ("ring"), so the chunk
# cannot be read from the declared shapes
CHUNK_KEY = "llama4_deploy.attention_chunk_size"
READ_BYTES = 16 << 20  # hashlib releases the GIL on large updates: threads hash in parallel
PART_BYTES = 256 << 20  # files above this also record per-part hashes, checked in parallel
VERIFY_ENV = "LLAMA4_DEPLOY_VERIFY_FILES"  # "0": skip the hash check (trusted fast starts)

_ORT_DTYPES = {
    "float32": "tensor(float)",
    "float16": "tensor(float16)",
    "int64": "tensor(int64)",
    "bool": "tensor(bool)",
}


def verify_files_default() -> bool:
    return os.environ.get(VERIFY_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


class RecordHasher:
    """`file_record`'s figures over bytes fed in order: the whole file's SHA-256 and, for a file larger than one
    part, the SHA-256 of each `part_bytes` slice too (one pass feeds both)."""

    def __init__(self, part_bytes: int = PART_BYTES):
        self.part_bytes = part_bytes
        self._whole, self._part = hashlib.sha256(), hashlib.sha256()
        self._parts: list[str] = []
        self._in_part = self.size = 0

    def update(self, data) -> None:
        self.update_whole(data)
        self.update_parts(data)

    def update_whole(self, data) -> None:
        """The whole file's half of `update` (the two halves may run on two threads, each fed in order)."""
        self._whole.update(data)
        self.size += memoryview(data).nbytes

    def update_parts(self, data) -> None:
        """The parts' half of `update`."""
        view = memoryview(data).cast("B")
        while view:
            block = view[: self.part_bytes - self._in_part]
            self._part.update(block)
            self._in_part += len(block)
            if self._in_part == self.part_bytes:
                self._parts.append(self._part.hexdigest())
                self._part, self._in_part = hashlib.sha256(), 0
            view = view[len(block) :]

    def record(self) -> dict:
        record: dict = {"size": self.size, "sha256": self._whole.hexdigest()}
        if self.size > self.part_bytes:
            parts = self._parts + ([self._part.hexdigest()] if self._in_part else [])
            record["parts"] = {"bytes": self.part_bytes, "sha256": parts}
        return record


def file_record(path: Path, part_bytes: int = PART_BYTES) -> dict:
    """Size and SHA-256 of a file, and for a file larger than one part the SHA-256 of each
    `part_bytes` slice too (one read feeds both), so a check can hash the parts in parallel."""
    hasher = RecordHasher(part_bytes)
    with open(path, "rb", buffering=0) as stream:
        while block := stream.read(READ_BYTES):
            hasher.update(block)
    return hasher.record()


def _slice_sha256(path: Path, offset: int, length: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as stream:
        stream.seek(offset)
        while length > 0 and (block := stream.read(min(READ_BYTES, length))):
            digest.update(block)
            length -= len(block)
    return digest.hexdigest()


def _workers(count: int) -> int:
    return max(1, min(count, os.cpu_count() or 1, 8))


def hash_files(bundle_dir: Path, names: Iterable[str]) -> dict[str, dict]:
    """{name: {size, sha256[, parts]}} for files of a bundle, hashed in parallel."""
    names = sorted(names)
    with ThreadPoolExecutor(_workers(len(names))) as pool:
        return dict(zip(names, pool.map(lambda name: file_record(bundle_dir / name), names)))


def _hash_tasks(name: str, record: dict) -> list[tuple[str, int, int, str]]:
    """(name, offset, length, expected SHA-256) per part of a file, or one task for a whole file."""
    parts = record.get("parts")
    if not (
        isinstance(parts, dict)
        and isinstance(parts.get("bytes"), int)
        and parts["bytes"] > 0
        and isinstance(parts.get("sha256"), list)
        and len(parts["sha256"]) == -(-record["size"] // parts["bytes"])
    ):
        return [(name, 0, record["size"], record["sha256"])]
    step = parts["bytes"]
    return [(name, i * step, min(step, record["size"] - i * step), digest) for i, digest in enumerate(parts["sha256"])]


def check_files(manifest: Manifest, names: Iterable[str] | None = None) -> tuple[int, int, float]:
    """Check size and SHA-256 of the manifest's files (all, or `names`); returns (files, bytes, seconds).

    Large files are checked part by part (their recorded part hashes), every part of every file
    on a pool of threads, so one big weights.data is hashed in parallel too."""
    start = time.perf_counter()
    records = manifest.files
    for name in manifest.used_files:
        if name not in records:
            raise BundleError(f"{manifest.path / 'manifest.json'} records no hash for {name}, which the bundle uses")
    names = sorted(records if names is None else names)
    for name in names:  # cheap checks first, so a missing or truncated file is named without hashing
        path = manifest.path / name
        if not path.is_file():
            raise BundleError(f"bundle {manifest.path} is missing {name}, which its manifest lists")
        size = path.stat().st_size
        if size != records[name]["size"]:
            raise BundleError(
                f"{name} in {manifest.path} has {size} bytes, the manifest records "
                f"{records[name]['size']}: the file was changed or truncated after the build"
            )
    changed = first_hash_mismatch(manifest.path, {name: records[name] for name in names})
    if changed is not None:
        raise BundleError(
            f"{changed} in {manifest.path} has changed since the build (its SHA-256 differs "
            f"from the manifest's); rebuild the bundle or restore the file"
        )
    return len(names), sum(records[n]["size"] for n in names), time.perf_counter() - start


def first_hash_mismatch(directory: Path, records: dict[str, dict]) -> str | None:
    """The first file (by name) of `records` whose SHA-256 differs from its record's, or None; the sizes are
    assumed checked. Every part of every file is hashed on a pool of threads."""
    names = sorted(records)
    tasks = [task for name in names for task in _hash_tasks(name, records[name])]
    log.info(
        "checking SHA-256 of %d files (%.1f MB) in %d parts on %d threads",
        len(names),
        sum(records[n]["size"] for n in names) / 1e6,
        len(tasks),
        _workers(len(tasks)),
    )

    def matches(task: tuple[str, int, int, str]) -> bool:
        name, offset, length, expected = task
        return _slice_sha256(directory / name, offset, length) == expected

    with ThreadPoolExecutor(_workers(len(tasks))) as pool:
        for (name, *_), ok in zip(tasks, pool.map(matches, tasks)):
            if not ok:
                return name
    return None


def layout_fingerprint(entries: Iterable[tuple[str, int, int, str, tuple[int, ...]]]) -> str:
    """SHA-256 over (initializer name, offset, length, dtype, shape) of external tensors, by name."""
    rows = sorted(
        [name, int(offset), int(length), str(dtype), [int(d) for d in shape]]
        for name, offset, length, dtype, shape in entries
    )
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def check_layout(manifest: Manifest, file: str, metadata: dict[str, str], stage: StageRecord | None = None) -> None:
    """The graph must have been saved against its stage's external-data layout (weights.data in an
    unsplit bundle), and traced with the chunk the manifest records for its chunked layers."""
    stage = stage or manifest.stages[0]
    chunk = metadata.get(CHUNK_KEY)
    for layer in manifest.layers:
        if layer.attention == "chunked" and chunk is not None and str(layer.slots) != chunk:
            raise BundleError(
                f"{file} in {manifest.path} attends chunks of {chunk} tokens, but the manifest records "
                f"a ring of {layer.slots} slots for layer {layer.index}"
            )
    got = metadata.get(LAYOUT_KEY)
    if got is None:
        raise BundleError(
            f"{file} in {manifest.path} carries no weight-layout fingerprint; it was not written by this bundle's build"
        )
    if got != stage.weights_layout:
        raise BundleError(
            f"{file} in {manifest.path} expects a different {stage.external_data} "
            f"layout than this bundle's (a graph from another bundle?); rebuild the bundle"
        )


def check_graph_io(
    manifest: Manifest,
    file: str,
    inputs: dict[str, tuple[str, list]],
    outputs: dict[str, tuple[str, list]],
    stage: StageRecord | None = None,
) -> None:
    """Declared inputs/outputs ({name: (ORT type string, dims)}) against the manifest's layers (those
    of `stage`, default the only one).

    Chunked layers' caches are [batch, K, C or "ring", D]; global layers' [batch, K, "context", D].
    A stage other than the last gives hidden_states_out [batch, new, hidden] instead of logits.
    """
    engine, model = manifest.engine, manifest.model
    stage = stage or manifest.stages[0]
    where = f"{file} in {manifest.path}"
    # `moe_overflow` is listed once for the stage, but only capacity graphs (with MoE layers) report it
    reports = any(g.get("reports_overflow") for g in stage.graphs.values() if g["file"] == file)
    listed_outputs = [name for name in stage.outputs if reports or name != abi.MOE_OVERFLOW]
    for kind, declared, listed in (("inputs", inputs, stage.inputs), ("outputs", outputs, listed_outputs)):
        if set(declared) != set(listed):
            missing, extra = sorted(set(listed) - set(declared)), sorted(set(declared) - set(listed))
            raise BundleError(
                f"{where} declares {kind} that disagree with the manifest (missing {missing}, "
                f"not in the manifest {extra})"
            )
    cache_type = _ORT_DTYPES.get(engine["cache_dtype"], engine["cache_dtype"])
    kv_heads, head_dim = model["num_kv_heads"], model["head_dim"]
    for layer in manifest.layers[stage.start : stage.stop]:
        for name, declared in (
            (abi.past_key(layer.index), inputs),
            (abi.past_value(layer.index), inputs),
            (abi.present_key(layer.index), outputs),
            (abi.present_value(layer.index), outputs),
        ):
            if name not in declared:
                raise BundleError(f"{where} has no {name}, though the manifest lists layer {layer.index}")
            dtype, dims = declared[name]
            if dtype != cache_type:
                raise BundleError(
                    f"{where} declares {name} as {dtype}, the manifest's cache dtype is {engine['cache_dtype']}"
                )
            if len(dims) != 4 or dims[1] != kv_heads or dims[3] != head_dim:
                raise BundleError(
                    f"{where} declares {name} with dims {dims}, the manifest implies "
                    f"[batch, {kv_heads}, cache, {head_dim}]"
                )
            if declared is inputs:
                _check_cache_dim(where, name, layer, dims[2])
    if not stage.last:
        dtype, dims = outputs[abi.HIDDEN_OUT]
        if dtype != cache_type or len(dims) != 3 or dims[2] != model["hidden_size"]:
            raise BundleError(
                f"{where} declares {abi.HIDDEN_OUT} as {dtype} {dims}, the manifest implies "
                f"{engine['cache_dtype']} [batch, new, {model['hidden_size']}]"
            )
        return
    logits_type = _ORT_DTYPES.get(engine["logits_dtype"], engine["logits_dtype"])
    dtype, dims = outputs[abi.LOGITS]
    vocab = dims[2] if len(dims) == 3 else None
    if dtype != logits_type or len(dims) != 3 or (isinstance(vocab, int) and vocab != manifest.vocab_size):
        raise BundleError(
            f"{where} declares {abi.LOGITS} as {dtype} {dims}, the manifest implies "
            f"{engine['logits_dtype']} [batch, new, {manifest.vocab_size}]"
        )


def _check_cache_dim(where: str, name: str, layer, slots) -> None:
    graph_chunked = isinstance(slots, int) or slots == "ring"
    if layer.attention == "chunked" and not graph_chunked:
        raise BundleError(
            f"the manifest marks layer {layer.index} chunked, but {where} declares {name} as a "
            f"global cache ({slots!r} slots)"
        )
    if layer.attention == "global" and graph_chunked:
        raise BundleError(
            f"the manifest marks layer {layer.index} global, but {where} declares {name} as a "
            f"chunked ring ({slots!r} slots)"
        )
    if layer.attention == "chunked" and isinstance(slots, int) and slots != layer.slots:
        raise BundleError(f"{where} declares {name} with a ring of {slots} slots, the manifest records {layer.slots}")
