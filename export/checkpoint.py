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
import re
from pathlib import Path
from typing import Any

from safetensors import safe_open

from llama4_deploy.export.compressed_tensors import CompressedTensorsError, CompressedTensorsFP8, LogicalTensors
from llama4_deploy.export.shape import ConfigError, ModelShape
from llama4_deploy.export.weights import all_weights
from llama4_deploy.runtime.paths import PathError, directory, kind

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")  # safetensors' names of the dtypes the build converts to float32
FP8_DTYPE = "F8_E4M3"  # compressed-tensors' float8_e4m3fn weights


def _natural(name: str) -> list:
    """Sort key putting layer 10 after layer 9."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be built; the message is one sentence for the user."""


class Checkpoint:
    """Lazy view of a Llama 4 checkpoint directory; tensors are named as in `Llama4ForCausalLM`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).resolve()
        try:
            directory(self.path, "checkpoint directory")
        except PathError as err:
            raise CheckpointError(str(err)) from None
        config_path = self.path / "config.json"
        found = kind(config_path)
        if found == "missing":
            raise CheckpointError(f"{self.path} has no config.json; pass a Hugging Face checkpoint directory")
        if found != "a file":
            raise CheckpointError(f"{config_path} is {found}, not a file")
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

    # -- agreement with config.json -----------------------------------------------------------------
    def check_tensors(self) -> None:
        """The checkpoint holds exactly the model config.json describes: every tensor it implies (export/weights.py),
        with the shape it implies and a floating-point dtype (or, in a compressed-tensors checkpoint, FP8 with its
        scales), and no tensor of the text model besides (a layer config.json does not count, an expert stack in a
        dense layer: the build would drop it silently). A multimodal checkpoint's vision tensors are not the text
        model's. Raises CheckpointError naming the first problem."""
        expected: set[str] = set()
        for source in all_weights(self.shape).values():
            name = source.checkpoint_name
            if not self.has(name):
                raise CheckpointError(f"tensor {self.prefix}{name} is missing from the checkpoint")
            got, implied = self.tensor_shape(name), source.checkpoint_shape
            if got != implied:
                raise CheckpointError(
                    f"tensor {self.prefix}{name} has shape {list(got)}, config.json implies {list(implied)}"
                )
            for stored in self._stored(name):
                expected.add(stored)
                dtype = self._slice(stored).get_dtype()
                if dtype not in FLOAT_DTYPES and not (dtype == FP8_DTYPE and self.logical is not None):
                    raise CheckpointError(
                        f"tensor {self.prefix}{stored} is stored as {dtype}; the build reads floating-point weights "
                        f"({', '.join(FLOAT_DTYPES)}), or FP8 in a compressed-tensors checkpoint, and never converts "
                        f"another type silently"
                    )
        extra = sorted(set(self._text_tensors()) - expected, key=_natural)
        if extra:
            raise CheckpointError(self._unexpected(extra[0], len(extra)))

    def _stored(self, name: str) -> list[str]:
        """The stored tensors a logical tensor is read from: itself, or a compressed-tensors checkpoint's per-expert
        Linear weights, and the FP8 scales beside them."""
        if self.logical is None:
            return [name]
        modules = self._logical(self.logical.stored_modules, name)
        if modules is None:
            return [name] + ([f"{name[: -len('.weight')]}.weight_scale"] if self.quantized(name) else [])
        return [f"{m}.{part}" for m in modules for part in ("weight", "weight_scale") if self._raw_has(f"{m}.{part}")]

    def _text_tensors(self) -> list[str]:
        """Every stored tensor of the text model, named without the multimodal prefix."""
        return [name[len(self.prefix) :] for name in self._file_of if name.startswith(self.prefix)]

    def _unexpected(self, name: str, count: int) -> str:
        more = f" (and {count - 1} more)" if count > 1 else ""
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        if layer and int(layer[1]) >= self.shape.num_layers:
            others = f", and {count - 1} more tensors" if count > 1 else ""
            return (
                f"the checkpoint holds layer {layer[1]} ({self.prefix}{name}{others}), but config.json's "
                f"num_hidden_layers is {self.shape.num_layers}; the build would drop it"
            )
        if name == "lm_head.weight" and self.shape.tie_word_embeddings:
            return (
                f"the checkpoint holds {self.prefix}{name}, but config.json ties the output head to the embeddings "
                f"(tie_word_embeddings true); the build would ignore it"
            )
        return (
            f"the checkpoint holds tensor {self.prefix}{name}{more}, which the model config.json describes does not "
            f"have; the build would ignore it"
        )

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

    # -- tensors outside the text model (a multimodal checkpoint's vision tower and projector), by full name ------
    def has_full(self, full: str) -> bool:
        return full in self._file_of

    def full_names(self) -> list[str]:
        return list(self._file_of)

    def full_shape(self, full: str) -> tuple[int, ...]:
        return tuple(self._open(self._file_of[full]).get_slice(full).get_shape())

    def full_tensor(self, full: str):
        shard = self._file_of.get(full)
        if shard is None:
            raise CheckpointError(f"tensor {full} is missing from the checkpoint in {self.path}")
        try:
            return self._open(shard).get_tensor(full)
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
