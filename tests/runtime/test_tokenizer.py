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


def test_flush_sends_what_the_decoder_held_back_so_text_equals_decode(byte_tokenizer):
    # a sequence that ends inside a multi-byte character: the held-back bytes come out at the end, as decoding
    # the whole sequence gives them (U+FFFD), streamed with or without stop strings that never complete
    ids = byte_tokenizer.encode(TEXT).ids
    for cut in range(1, len(ids) + 1):
        for stop in ((), ("absent", "zz")):
            stream = TextStream(byte_tokenizer, stop)
            sent = "".join(stream.push(token) for token in ids[:cut]) + stream.flush()
            assert sent == byte_tokenizer.decode(ids[:cut]), cut
    assert "\ufffd" in byte_tokenizer.decode(ids[:2])  # so some cuts above did end inside a character


def test_token_text_and_bytes_of_a_byte_level_tokenizer(byte_tokenizer, tmp_path):
    from llama4_deploy.runtime.tokenizer import Tokenizer

    byte_tokenizer.save(str(tmp_path / "tokenizer.json"))
    tokenizer = Tokenizer(tmp_path / "tokenizer.json")
    ids = tokenizer.encode(" the ñ\n")
    assert [tokenizer.token_text(t) for t in ids[:2]] == [" ", "t"]  # decoded text, not "Ġ"
    assert tokenizer.token_bytes(ids[-1]) == b"\n" and tokenizer.token_text(ids[-1]) == "\n"  # not "Ċ", [196, 138]
    half = tokenizer.encode("ñ")
    assert [tokenizer.token_bytes(t) for t in half] == [b"\xc3", b"\xb1"]  # each token's own byte
    assert b"".join(tokenizer.token_bytes(t) for t in tokenizer.encode(TEXT)) == TEXT.encode()


def test_token_bytes_of_a_word_level_tokenizer(tmp_path):
    from llama4_deploy.runtime.tokenizer import Tokenizer
    from tests.conftest import write_tokenizer

    write_tokenizer(tmp_path / "tokenizer.json", 16)
    tokenizer = Tokenizer(tmp_path / "tokenizer.json")
    assert tokenizer.token_text(5) == "w5" and tokenizer.token_bytes(5) == b"w5"
