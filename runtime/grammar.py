"""Structured output: a token mask per row from xgrammar (the grammar engine vLLM, SGLang and TensorRT-LLM use),
applied by the scheduler before sampling, so constrained and free requests share a batch.

`Grammars` compiles what a request asks for (JSON, a JSON schema, a regex, a choice among strings, an EBNF
grammar) against the bundle's vocabulary, given as each token's own bytes; `Constraint` is one request's matcher:
the tokens allowed next, and the token taken. xgrammar imports torch, so it is imported only when a request asks
for structure (the runtime imports neither torch nor transformers at import time).
"""

from __future__ import annotations

import collections
import json
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


class GrammarError(ValueError):
    """What a request asked for cannot be compiled (a bad schema, regex or grammar)."""


CACHED_GRAMMARS = 64  # distinct grammars kept compiled; the least recently used goes first


class Grammars:
    """Compiles grammars for one vocabulary, once per distinct request (the last CACHED_GRAMMARS are kept, so
    clients sending ever new schemas cannot grow the server's memory without bound)."""

    def __init__(self, token_bytes: Callable[[int], bytes], vocab_size: int, stop_token_ids: Sequence[int]):
        self._token_bytes, self.vocab_size, self._stop = token_bytes, vocab_size, list(stop_token_ids)
        self._compiler = None
        self._cache: collections.OrderedDict[tuple[str, str], Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def _xgr(self):
        import xgrammar  # deferred on purpose: it imports torch

        if self._compiler is None:
            vocab = [self._token_bytes(t) for t in range(self.vocab_size)]
            info = xgrammar.TokenizerInfo(
                vocab, xgrammar.VocabType.RAW, vocab_size=self.vocab_size, stop_token_ids=self._stop
            )
            self._compiler = xgrammar.GrammarCompiler(info)
        return xgrammar, self._compiler

    def _compile(self, kind: str, source: str, make) -> Any:
        with self._lock:
            key = (kind, source)
            if key in self._cache:
                self._cache.move_to_end(key)
            else:
                xgr, compiler = self._xgr()
                try:
                    self._cache[key] = make(compiler)
                except Exception as err:  # xgrammar raises RuntimeError/ValueError subclasses with its reason
                    reason = " ".join(str(err).split())[:300]
                    raise GrammarError(f"cannot be compiled into a grammar ({reason})") from None
                if len(self._cache) > CACHED_GRAMMARS:
                    self._cache.popitem(last=False)
            return self._cache[key]

    def json_object(self):
        return self._compile("json", "", lambda c: c.compile_builtin_json_grammar())

    def json_schema(self, schema: dict | str):
        text = schema if isinstance(schema, str) else json.dumps(schema, sort_keys=True)
        # no free whitespace: a model may otherwise pad a valid document forever
        return self._compile("schema", text, lambda c: c.compile_json_schema(text, any_whitespace=False))

    def regex(self, pattern: str):
        return self._compile("regex", pattern, lambda c: c.compile_regex(pattern))

    def choice(self, options: Sequence[str]):
        return self.regex("|".join(f"({re.escape(option)})" for option in options))

    def ebnf(self, grammar: str):
        return self._compile("ebnf", grammar, lambda c: c.compile_grammar(grammar))


class Constraint:
    """One request's grammar state: `allowed()` the tokens that may come next, `accept(token)` after sampling."""

    def __init__(self, compiled: Any, vocab_size: int):
        import xgrammar  # deferred on purpose: it imports torch

        self._matcher = xgrammar.GrammarMatcher(compiled)
        self._bitmask = np.zeros(xgrammar.get_bitmask_shape(1, vocab_size), dtype=np.int32)  # [1, ceil(V/32)]
        self.vocab_size = vocab_size

    def allowed(self) -> np.ndarray:
        """[V] bool: the tokens the grammar allows next."""
        self._matcher.fill_next_token_bitmask(self._bitmask, 0)
        bits = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")  # bit t of word t // 32
        return bits[: self.vocab_size].astype(bool)

    def accept(self, token: int) -> None:
        if not self._matcher.accept_token(token):
            raise RuntimeError(f"the grammar refused token {token}, which its own mask allowed")

    @property
    def complete(self) -> bool:
        """The text so far is a whole document of the grammar and nothing may follow."""
        return self._matcher.is_terminated()
