"""Tokenizer glue: the bundle's tokenizer.json through the `tokenizers` library (no remote code), and
incremental detokenization for streaming (`TextStream`)."""

from __future__ import annotations

from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

from llama4_deploy.runtime.bundle import BundleError, Manifest


class Tokenizer:
    def __init__(self, path):
        try:
            self._tokenizer = HFTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception for a damaged file
            reason = " ".join(str(err).split())[:200]
            raise BundleError(f"{path} is not a readable tokenizer.json ({reason})") from None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL while it works (encode holds it): a server tokenizing a huge prompt on a
        # worker thread keeps answering meanwhile
        return self._tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids)

    def token_text(self, token: int) -> str:
        """The vocabulary entry of one token (what logprobs name it by)."""
        return self._tokenizer.id_to_token(token) or ""

    def stream(self, stop: tuple[str, ...] = ()) -> TextStream:
        return TextStream(self._tokenizer, stop)


class TextStream:
    """Text of a growing token sequence, handed out in pieces as tokens arrive.

    A piece never ends inside a multi-byte character: the `tokenizers` library's DecodeStream holds
    tokens back until they decode to whole characters. With stop strings, text that could still
    become the start of one is held back too, and the text ends just before the first stop string.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self._tokenizer = tokenizer
        self._decoder = DecodeStream(skip_special_tokens=False)
        self.stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self.stop), default=1) - 1  # chars that may start a stop string
        self.text = ""  # everything decoded so far (up to a stop string)
        self._sent = 0  # chars of `text` handed out
        self.stopped = False  # a stop string was reached

    def push(self, token: int) -> str:
        """Add one token; returns the text that is now safe to send (possibly empty)."""
        if self.stopped:
            return ""
        self.text += self._decoder.step(self._tokenizer, token) or ""
        if self.stop:
            search_from = max(0, self._sent - self._hold)
            hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self.flush()
        safe = len(self.text) - self._hold if self.stop else len(self.text)
        if safe <= self._sent:
            return ""
        piece, self._sent = self.text[self._sent : safe], safe
        return piece

    def flush(self) -> str:
        """The held-back rest, at the end of the sequence."""
        piece, self._sent = self.text[self._sent :], len(self.text)
        return piece


def load_tokenizer(manifest: Manifest) -> Tokenizer:
    path = manifest.tokenizer_path
    if path is None or not path.is_file():
        raise BundleError(f"bundle {manifest.name} has no tokenizer.json; pass --ids instead of --prompt")
    return Tokenizer(path)
