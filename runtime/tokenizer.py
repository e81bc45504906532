"""Tokenizer glue: the bundle's tokenizer.json through the `tokenizers` library (no remote code), and
incremental detokenization for streaming (`TextStream`)."""

from __future__ import annotations

import json
import re

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import pre_tokenizers
from tokenizers.decoders import DecodeStream

from llama4_deploy.runtime.bundle import BundleError, Manifest


class Tokenizer:
    def __init__(self, path):
        try:
            self._tokenizer = HFTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception for a damaged file
            reason = " ".join(str(err).split())[:200]
            raise BundleError(f"{path} is not a readable tokenizer.json ({reason})") from None
        self._decoder_kinds: set[str] | None = None

    @classmethod
    def wrapping(cls, tokenizer: HFTokenizer) -> Tokenizer:
        """The wrapper over a `tokenizers.Tokenizer` already loaded (the training tools hold one)."""
        wrapped = cls.__new__(cls)
        wrapped._tokenizer, wrapped._decoder_kinds = tokenizer, None
        return wrapped

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL while it works (encode holds it): a server tokenizing a huge prompt on a
        # worker thread keeps answering meanwhile
        return self._tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids)

    def token_text(self, token: int) -> str:
        """The decoded text of one token (what logprobs name it by): `"Ġthe"` is `" the"`; a token that ends
        inside a multi-byte character decodes with U+FFFD where its bytes do not complete one."""
        return token_text(self._tokenizer, token)

    def token_bytes(self, token: int) -> bytes:
        """The token's own bytes (a byte-level token that holds part of a character gives that part)."""
        if self._decoder_kinds is None:
            self._decoder_kinds = _decoder_kinds(self._tokenizer)
        return token_bytes(self._tokenizer, token, self._decoder_kinds)

    def stream(self, stop: tuple[str, ...] = ()) -> TextStream:
        return TextStream(self._tokenizer, stop)


_BYTE_OF_CHAR: dict[str, int] = {}
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _decoder_kinds(tokenizer) -> set[str]:
    decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
    kinds = {decoder.get("type")}
    kinds.update(d.get("type") for d in decoder.get("decoders", []) or [])
    return kinds


def token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)


def token_bytes(tokenizer, token: int, kinds: set[str]) -> bytes:
    """A token's own bytes: byte-level BPE (GPT-2's and Llama 4's) spells each byte as one printable character,
    mapped back here; a byte-fallback piece `<0xE2>` is that byte; any other token is its decoded text. `kinds`:
    the decoder types of the tokenizer (`_decoder_kinds`)."""
    piece = tokenizer.id_to_token(token)
    if piece is None:
        return b""
    if "ByteLevel" in kinds:
        if not _BYTE_OF_CHAR:
            alphabet = _byte_level_alphabet()
            _BYTE_OF_CHAR.update({char: byte for byte, char in enumerate(alphabet)})
        if all(char in _BYTE_OF_CHAR for char in piece):
            return bytes(_BYTE_OF_CHAR[char] for char in piece)
    if "ByteFallback" in kinds and (match := _BYTE_FALLBACK.match(piece)):
        return bytes([int(match.group(1), 16)])
    return token_text(tokenizer, token).encode()


def _byte_level_alphabet() -> list[str]:
    """GPT-2's bytes_to_unicode: byte b is spelled by the b-th character of this list."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    assert set(chars) == set(pre_tokenizers.ByteLevel.alphabet())
    return chars


class TextStream:
    """Text of a growing token sequence, handed out in pieces as tokens arrive.

    A piece never ends inside a multi-byte character: the `tokenizers` library's DecodeStream holds
    tokens back until they decode to whole characters. With stop strings, text that could still
    become the start of one is held back too, and the text ends just before the first stop string.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
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
        self._ids.append(token)
        self.text += self._decoder.step(self._tokenizer, token) or ""
        if self._cut_at_stop():
            return self.flush()
        safe = len(self.text) - self._hold if self.stop else len(self.text)
        if safe <= self._sent:
            return ""
        piece, self._sent = self.text[self._sent : safe], safe
        return piece

    def _cut_at_stop(self) -> bool:
        """End the text at the first stop string it holds (searched from where held-back text begins)."""
        if not self.stop:
            return False
        search_from = max(0, self._sent - self._hold)
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
        return bool(hits)

    def flush(self) -> str:
        """The held-back rest, at the end of the sequence: text that could have begun a stop string, and the
        tokens the decoder held back for an incomplete character (decoded as the whole sequence decodes them,
        U+FFFD included), so that the text sent equals `decode(tokens)` up to a stop string that completed."""
        if not self.stopped:
            whole = self._tokenizer.decode(self._ids, skip_special_tokens=False)
            if whole.startswith(self.text):
                self.text = whole
            self._cut_at_stop()
        piece, self._sent = self.text[self._sent :], len(self.text)
        return piece


def load_tokenizer(manifest: Manifest) -> Tokenizer:
    path = manifest.tokenizer_path
    if path is None or not path.is_file():
        raise BundleError(f"bundle {manifest.name} has no tokenizer.json; pass --ids instead of --prompt")
    return Tokenizer(path)
