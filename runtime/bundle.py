"""Bundle format: a directory with manifest.json, the engine files, tokenizer and golden I/O.

The runtime learns everything from the manifest; nothing about the model is hard-coded here.
Written by the build (export/ and graphs/ may import this module), read by `load`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
GOLDEN = "golden.npz"


class BundleError(ValueError):
    """A bundle directory that cannot be loaded; the message is one sentence."""


@dataclasses.dataclass(frozen=True)
class LayerCache:
    index: int
    attention: str  # "chunked" (ring buffer of `slots`) or "global" (slot j holds position j)
    slots: int | None  # ring size for chunked layers; None: sized by the context at run time


@dataclasses.dataclass(frozen=True)
class Manifest:
    raw: dict[str, Any]
    path: Path

    @property
    def name(self) -> str:
        return self.raw["name"]

    @property
    def layers(self) -> list[LayerCache]:
        return [LayerCache(l["index"], l["attention"], l.get("cache_slots")) for l in self.raw["layers"]]

    @property
    def model(self) -> dict[str, Any]:
        return self.raw["model"]

    @property
    def engine(self) -> dict[str, Any]:
        return self.raw["engine"]

    @property
    def profiles(self) -> dict[str, int]:
        return self.raw["profiles"]

    @property
    def vocab_size(self) -> int:
        return self.model["vocab_size"]

    @property
    def max_context(self) -> int:
        return self.profiles["max_context"]

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self.model.get("eos_token_ids") or [])

    @property
    def tokenizer_path(self) -> Path | None:
        name = self.raw.get("tokenizer")
        return self.path / name if name else None

    @property
    def tokenizer_config_path(self) -> Path | None:
        """tokenizer_config.json copied from the checkpoint (its chat template), when it had one."""
        name = self.raw.get("tokenizer_config")
        return self.path / name if name else None


def read_manifest(bundle_dir: str | Path) -> Manifest:
    path = Path(bundle_dir)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{path} is not a bundle: it has no {MANIFEST}")
    try:
        raw = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise BundleError(f"{manifest_path} is not valid JSON ({err})") from None
    if raw.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{manifest_path} has format_version {raw.get('format_version')}; this runtime reads {FORMAT_VERSION}")
    return Manifest(raw, path.resolve())


def write_manifest(bundle_dir: str | Path, raw: dict[str, Any]) -> None:
    raw = {"format_version": FORMAT_VERSION, **raw}
    (Path(bundle_dir) / MANIFEST).write_text(json.dumps(raw, indent=2, sort_keys=False) + "\n")
