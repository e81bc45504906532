"""Resumable builds: each build step's output, kept under a hash of the step's inputs, beside --out.

    <parent>/.<name>.build/                  created by this tool (it holds MARKER), removed when a
                                             build to <parent>/<name> succeeds or is refused for bad
                                             input; kept after an interrupt or a crash
        checkpoint-<key>/                    a finished step: its files and record.json
        trace-<key>/  plan-<key>/  stage0-<key>/ ... golden-<key>/
        stage1-<key>.partial-<random>/       a step being written; renamed to stage1-<key> when done

A step's key is the SHA-256 of what it reads: the recipe (with every override), the checkpoint's
identity (name, size and mtime of each file of its directory, or the key of the random checkpoint
step), the calibration file's SHA-256, the keys of the steps it consumes, and the code (the SHA-256
of every source file of the package and the versions of the libraries that compute or write a
step's files: torch, transformers, onnx, onnx-ir, onnxscript, onnxruntime, numpy, ml-dtypes,
safetensors, tokenizers). A rerun after an interrupted build (Ctrl-C, or a kill: SIGKILL included)
finds the finished steps under the same keys and reuses them ("[resume] reusing ..."); anything
changed gives new keys, so stale work is never reused.

A finished step's record.json also holds the size and SHA-256 of every file the step wrote, and a
step is reused only when its directory holds exactly those files with those hashes: a file edited,
truncated, removed or added since (by hand, or by a killed process) makes the rerun say so
("[resume] ... recomputing") and compute the step again, instead of building from it.

The cache is used only under the build's lock on --out (outdir.py); a finished step appears by a
rename, so a killed build leaves only `.partial-` directories, which the next build removes. Files
enter the staging bundle as hard links (a copy where the file system has none), so a reused step
costs no copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import llama4_deploy
import llama4_deploy.export
import llama4_deploy.graphs
import llama4_deploy.runtime
from llama4_deploy.runtime.integrity import first_hash_mismatch, hash_files

MARKER = "llama4-deploy-build-cache"
RECORD = "record.json"
PARTIAL = ".partial-"


class CacheError(ValueError):
    """A build cache this build must not touch; the message is one sentence."""


# the libraries whose versions decide what a step writes (numpy and ml-dtypes compute and convert weights,
# safetensors writes the random checkpoint, tokenizers encodes calibration text)
_LIBRARIES = (
    "torch",
    "transformers",
    "onnx",
    "onnx-ir",
    "onnxscript",
    "onnxruntime",
    "numpy",
    "ml-dtypes",
    "safetensors",
    "tokenizers",
)
_CODE: str | None = None


def code_version() -> str:
    """SHA-256 of the package's source files and of the versions of the libraries that write graphs."""
    global _CODE
    if _CODE is None:
        digest = hashlib.sha256()
        for module in (llama4_deploy, llama4_deploy.export, llama4_deploy.graphs, llama4_deploy.runtime):
            directory = Path(module.__file__).parent
            for path in sorted(directory.rglob("*.py")):
                digest.update(f"{directory.name}/{path.relative_to(directory).as_posix()}\0".encode())
                digest.update(path.read_bytes())
        for library in _LIBRARIES:
            digest.update(f"{library}={metadata.version(library)}\0".encode())
        _CODE = digest.hexdigest()
    return _CODE


def checkpoint_identity(directory: Path) -> list[tuple[str, int, int]]:
    """(name, size, mtime in ns) of every file in a checkpoint directory: a changed shard changes its key."""
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(directory).iterdir() if p.is_file())


def step_key(*inputs: Any) -> str:
    """A step's key: SHA-256 over its inputs (JSON) and the code version."""
    payload = json.dumps([code_version(), *inputs], sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


class BuildCache:
    """The build cache of one --out; use it only while holding that --out's lock (outdir.Staging)."""

    def __init__(self, out: Path, log):
        self.dir = out.parent / f".{out.name}.build"
        self.log = log

    def open(self) -> BuildCache:
        """Create the cache, or take over this tool's own one (removing killed builds' partial steps)."""
        if self.dir.exists():
            if not (self.dir.is_dir() and (self.dir / MARKER).is_file()):
                raise CacheError(
                    f"{self.dir} exists and is not a build cache written by llama4-deploy; move it away "
                    f"so the build can keep its resumable steps there"
                )
            for path in self.dir.iterdir():
                if PARTIAL in path.name and path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
        else:
            self.dir.mkdir(parents=True)
            (self.dir / MARKER).write_text("resumable steps of an unfinished llama4-deploy build; safe to delete\n")
        return self

    def finished(self) -> list[str]:
        return (
            sorted(p.name for p in self.dir.iterdir() if p.is_dir() and PARTIAL not in p.name)
            if self.dir.is_dir()
            else []
        )

    def entry(self, step: str, key: str) -> Path:
        """Where a finished step with this key lives."""
        return self.dir / f"{step}-{key[:32]}"

    def link_files(self, step: str, key: str, target: Path) -> list[str]:
        """Hard-link (or copy) a finished step's files, record.json excepted, into `target`; returns their names."""
        names = sorted(p.name for p in self.entry(step, key).iterdir() if p.name != RECORD)
        for name in names:
            link_or_copy(self.entry(step, key) / name, target / name)
        return names

    def get(self, step: str, key: str) -> tuple[Path, dict[str, Any]] | None:
        """The directory and record of a finished step with this key whose files are still the ones it wrote, or
        None. A step whose files changed since is removed, and the log says why it is computed again."""
        entry = self.entry(step, key)
        if not entry.exists():
            return None
        problem = self._changed(entry, key)
        if problem is not None:
            self.log(f"[resume] {step} (key {key[:12]}) no longer holds what it stored ({problem}); recomputing it")
            # the tool's own entry, under the lock: the step is written again
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            return None
        self.log(f"[resume] reusing {step} (key {key[:12]})")
        return entry, json.loads((entry / RECORD).read_text())["record"]

    def _changed(self, entry: Path, key: str) -> str | None:
        """What differs between a finished step's directory and its record (a phrase), or None."""
        try:
            data = json.loads((entry / RECORD).read_text())
        except (OSError, ValueError):
            return f"its {RECORD} is unreadable"
        files = data.get("files") if isinstance(data, dict) else None
        if not (
            isinstance(files, dict)
            and data.get("key") == key
            and "record" in data
            and all(
                isinstance(r, dict) and isinstance(r.get("size"), int) and isinstance(r.get("sha256"), str)
                for r in files.values()
            )
        ):
            return f"its {RECORD} was not written by this build"
        present = {p.name for p in entry.iterdir() if p.name != RECORD}
        for name in sorted(set(files) | present):
            path = entry / name
            if name not in present:
                return f"{name} is gone"
            if name not in files:
                return f"{name} was added"
            size = path.stat().st_size if path.is_file() else -1
            if size != files[name].get("size"):
                return f"{name} has {size} bytes, {files[name]['size']} were stored"
        changed = first_hash_mismatch(entry, files)
        return None if changed is None else f"{changed} has another SHA-256"

    @contextlib.contextmanager
    def put(self, step: str, key: str) -> Iterator[tuple[Path, dict[str, Any]]]:
        """A directory to write a step's files into and a dict for its record; both are kept under the
        key only when the block completes (a rename), and removed if it raises. The size and SHA-256 of every
        file in the directory are recorded beside them; a step that hashed its files as it wrote them (the
        save step) leaves those records in record["files"], and the rest are hashed here."""
        partial = Path(tempfile.mkdtemp(prefix=f"{step}-{key[:32]}{PARTIAL}", dir=self.dir))
        record: dict[str, Any] = {}
        try:
            yield partial, record
            known = record.get("files") if isinstance(record.get("files"), dict) else {}
            names = sorted(p.name for p in partial.iterdir())
            files = {
                **hash_files(partial, [n for n in names if n not in known]),
                **{n: known[n] for n in names if n in known},
            }
            data = {"key": key, "record": record, "files": dict(sorted(files.items()))}
            (partial / RECORD).write_text(json.dumps(data, indent=1) + "\n")
            partial.rename(self.entry(step, key))
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        self.log(f"[cache] stored {step} (key {key[:12]})")

    def close(self, keep: bool) -> None:
        """Remove the cache (after a successful build, or one refused for bad input), unless `keep` (an
        interrupted or crashed build) and it holds a finished step to resume from."""
        if not self.dir.is_dir():
            return
        if not keep or not self.finished():
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            self.log(
                f"[resume] kept {len(self.finished())} finished step(s) in {self.dir}; rerun the same build to resume"
            )
