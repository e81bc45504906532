"""Incremental detokenization: pieces never split a multi-byte character, stop strings end the text."""

from __future__ import annotations

import pytest

from llama4_deploy.runtime.tokenizer import TextStream

TEXT = "héllo, 世界 🦙 naïve"


@pytest.fixture(scope="module")
def byte_tokenizer():
    """Byte-level BPE without merges: one token per UTF-8 byte, so every non-ASCII character spans
    2 to 4 tokens and a naive per-token decode would emit U+FFFD halves."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer = Tokenizer(models.BPE({ch: i for i, ch in enumerate(sorted(alphabet))}, []))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def test_pieces_never_split_a_character(byte_tokenizer):
    ids = byte_tokenizer.encode(TEXT).ids
    assert len(ids) == len(TEXT.encode())  # the fixture really splits characters into bytes
    assert "\ufffd" in byte_tokenizer.decode(ids[:2])  # "h" + half of "é": what must never be sent
    stream = TextStream(byte_tokenizer)
    pieces = [stream.push(token) for token in ids]
    assert "".join(pieces) == TEXT and stream.flush() == ""
    assert not any("\ufffd" in piece for piece in pieces)
    assert pieces.count("") == len(ids) - len(TEXT)  # one held-back token per extra byte


@pytest.mark.parametrize("stop, expected", [(("世界",), "héllo, "), (("🦙", "lo"), "hél"), (("absent",), TEXT)])
def test_stop_strings_end_the_text_before_them_even_across_tokens(byte_tokenizer, stop, expected):
    stream = TextStream(byte_tokenizer, stop)
    sent = []
    for token in byte_tokenizer.encode(TEXT).ids:
        sent.append(stream.push(token))
        if stream.stopped:
            break
    sent.append(stream.flush())
    assert "".join(sent) == expected
    assert stream.stopped == (expected != TEXT)
    assert not any(s in "".join(sent) for s in stop)  # no part of a stop string was ever sent
