"""Grammar masks (runtime/grammar.py) on a vocabulary of the 256 single bytes, with xgrammar."""

from __future__ import annotations

import pytest

pytest.importorskip("xgrammar", reason="the serve extra is not installed")

from llama4_deploy.runtime import grammar  # noqa: E402

V = 257  # 256 bytes and a stop token


def grammars() -> grammar.Grammars:
    return grammar.Grammars(lambda t: bytes([t]) if t < 256 else b"", V, [256])


def test_a_constraint_allows_exactly_the_grammar_s_next_bytes_and_ends_with_it():
    constraint = grammar.Constraint(grammars().regex("a[bc]"), V)
    allowed = constraint.allowed()
    assert allowed.nonzero()[0].tolist() == [ord("a")]
    constraint.accept(ord("a"))
    assert constraint.allowed().nonzero()[0].tolist() == [ord("b"), ord("c")]
    constraint.accept(ord("c"))
    assert constraint.allowed().nonzero()[0].tolist() == [256]  # only the stop token is left
    constraint.accept(256)
    assert constraint.complete
    with pytest.raises(RuntimeError, match="refused token"):
        fresh = grammar.Constraint(grammars().regex("a"), V)
        fresh.accept(ord("z"))


def test_bad_sources_are_grammar_errors_and_the_cache_is_bounded(monkeypatch):
    compiled = grammars()
    with pytest.raises(grammar.GrammarError, match="cannot be compiled into a grammar"):
        compiled.regex("a[")
    monkeypatch.setattr(grammar, "CACHED_GRAMMARS", 4)
    for i in range(6):
        compiled.regex(f"x{i}")
    assert len(compiled._cache) == 4 and ("regex", "x5") in compiled._cache and ("regex", "x0") not in compiled._cache
