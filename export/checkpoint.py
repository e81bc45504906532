"""Hugging Face Llama 4 checkpoints, read lazily.

A checkpoint is a directory with config.json, one `model.safetensors` or shards listed by
`model.safetensors.index.json`, and optionally tokenizer.json. Shards are memory-mapped and a
tensor is read only when asked for, so a build touches one layer at a time. Multimodal
checkpoints (model_type `llama4`) keep the text model under `language_model.`; the prefix is
resolved here and callers name tensors as a text-only checkpoint does.

safetensors only: nothing here unpickles.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import safe_open

from llama4_deploy.export.compressed_tensors import CompressedTensorsError, CompressedTensorsFP8, LogicalTensors
from llama4_deploy.export.shape import ConfigError, ModelShape

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be built; the message is one sentence for the user."""


class Checkpoint:
    """Lazy view of a Llama 4 checkpoint directory; tensors are named as in `Llama4ForCausalLM`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).resolve()
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint directory {self.path} does not exist")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{self.path} has no config.json; pass a Hugging Face checkpoint directory")
        try:
            self.config: dict[str, Any] = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{config_path} is not valid JSON ({err})") from None
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{config_path} is not a JSON object")
        try:
            self.shape = ModelShape.from_config(self.config)
        except ConfigError as err:
            raise CheckpointError(str(err)) from None
        self.prefix = "language_model." if self.config.get("model_type") == "llama4" else ""
        self._handles: dict[Path, Any] = {}
        self._file_of = self._read_weight_map()
        self.logical = self._compressed_tensors()

    def _compressed_tensors(self):
        """Pre-quantized FP8 (compressed-tensors) tensors under Llama4ForCausalLM's names, or None."""
        try:
            scheme = CompressedTensorsFP8.from_config(self.config)
        except CompressedTensorsError as err:
            raise CheckpointError(f"{self.path}: {err}") from None
        if scheme is None:
            return None
        return LogicalTensors(
            scheme,
            self._raw_has,
            self._raw_shape,
            lambda n: self._slice(n).get_dtype(),
            self._raw_tensor,
            self.prefix,
            self.shape.num_experts,
        )

    def _logical(self, read, name: str):
        try:
            return read(name)
        except CompressedTensorsError as err:
            raise CheckpointError(str(err)) from None

    # -- layout -------------------------------------------------------------------------------
    def _read_weight_map(self) -> dict[str, Path]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index} is not a safetensors index (no weight_map)") from None
            files = {name: self.path / shard for name, shard in weight_map.items()}
            for shard in sorted(set(files.values())):
                if not shard.is_file():
                    raise CheckpointError(f"{index.name} names shard {shard.name}, which is missing from {self.path}")
            return files
        single = self.path / SINGLE_FILE
        if single.is_file():
            return {name: single for name in self._open(single).keys()}
        shards = sorted(self.path.glob("*.safetensors"))
        if shards:
            raise CheckpointError(f"{self.path} has safetensors shards but no {INDEX_FILE} to say what is in them")
        raise CheckpointError(f"{self.path} has no {SINGLE_FILE} and no {INDEX_FILE}; weights must be safetensors")

    def _open(self, shard: Path):
        handle = self._handles.get(shard)
        if handle is None:
            try:
                handle = safe_open(str(shard), framework="pt")
            except Exception as err:  # safetensors raises its own error types for damaged files
                raise CheckpointError(f"{shard.name} is not a readable safetensors file ({err})") from None
            self._handles[shard] = handle
        return handle

    # -- tensors ------------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return self._raw_has(name) if self.logical is None else self._logical(self.logical.has, name)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._raw_shape(name) if self.logical is None else self._logical(self.logical.shape, name)

    def quantized(self, name: str) -> bool:
        """Whether the checkpoint stores `name` in FP8 (compressed-tensors); its bytes: `self.logical.fp8`."""
        return self.logical is not None and self._logical(self.logical.quantized, name)

    def _raw_has(self, name: str) -> bool:
        return self.prefix + name in self._file_of

    def _raw_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def _slice(self, name: str):
        full = self.prefix + name
        shard = self._file_of.get(full)
        if shard is None:
            raise CheckpointError(f"tensor {full} is missing from the checkpoint in {self.path}")
        handle = self._open(shard)
        try:
            return handle.get_slice(full)
        except Exception:
            raise CheckpointError(f"{shard.name} does not hold tensor {full}, though the index says it does") from None

    def tensor(self, name: str):
        """Read one tensor (a torch.Tensor in the checkpoint's dtype) from its memory-mapped shard; a
        pre-quantized checkpoint's FP8 tensors come dequantized to float32 (experts stacked)."""
        if self.logical is not None:
            return self._logical(self.logical.float_tensor, name)
        return self._raw_tensor(name)

    def _raw_tensor(self, name: str):
        full = self.prefix + name
        shard = self._file_of.get(full)
        if shard is None:
            raise CheckpointError(f"tensor {full} is missing from the checkpoint in {self.path}")
        try:
            return self._open(shard).get_tensor(full)
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f"tensor {full} in {shard.name} cannot be read ({err})") from None

    @property
    def tokenizer_file(self) -> Path | None:
        path = self.path / "tokenizer.json"
        return path if path.is_file() else None

    @property
    def tokenizer_config_file(self) -> Path | None:
        """tokenizer_config.json (chat template, special tokens), kept with tokenizer.json."""
        path = self.path / "tokenizer_config.json"
        return path if path.is_file() and self.tokenizer_file is not None else None
