"""Tokenizer glue: the bundle's tokenizer.json through the `tokenizers` library (no remote code)."""

from __future__ import annotations

from llama4_deploy.runtime.bundle import BundleError, Manifest


class Tokenizer:
    def __init__(self, path):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tokenizer = HFTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception for a damaged file
            reason = " ".join(str(err).split())[:200]
            raise BundleError(f"{path} is not a readable tokenizer.json ({reason})") from None

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids)


def load_tokenizer(manifest: Manifest) -> Tokenizer:
    path = manifest.tokenizer_path
    if path is None or not path.is_file():
        raise BundleError(f"bundle {manifest.name} has no tokenizer.json; pass --ids instead of --prompt")
    return Tokenizer(path)
