"""`make loadtest`'s driver on the tiny bundle: a short run prints the table and finds every answer."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
pytest.importorskip("openai", reason="the test extra (openai client) is not installed")
pytest.importorskip("aiohttp", reason="the test extra (aiohttp, the load generator) is not installed")


def test_loadtest_prints_its_table_and_checks_every_answer(tiny_bundle, capsys):
    from tools.loadtest import main

    code = main(
        [
            "--bundle",
            str(tiny_bundle),
            "--requests",
            "1",
            "--max-tokens",
            "4",
            "--prompt-tokens",
            "6",
            "--time-limit",
            "120",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+[\d.]+\s+[\d.]+", out, flags=re.M)
    assert rows == [("1", "8"), ("4", "8"), ("8", "8"), ("16", "16")]
    head = r"generate on one batch -?[\d.]+, server with 8 concurrent clients [\d.]+ \(-?\d+% of generate"
    assert re.search(head, out), out
    # (on tiny a round of generate decodes 3 steps of a fraction of a millisecond: its decode time, generate(4) -
    # generate(1), is noise and may come out negative, and so may a round's ratio)
    assert re.search(r"per round -?\d+% to -?\d+%, \d of 7 below 80%", out), out
    assert re.search(r"^the same rounds from OpenAI's Python client .*: -?\d+% of generate; per round", out, flags=re.M)
    assert "every answer arrived once and equals generate on its prompt" in out
    # the breakdown comes from the server's step trace: after a round's first prefill come at least the last answer's
    # 3 decode steps (4 tokens), at most 3 per wave of rows (8 clients on tiny's 4 rows: 2 waves) and a few more when
    # a wave's prefill is split; its engine time is real
    waves = -(-8 // int(re.search(r"max_batch (\d+)", out).group(1)))
    steps = re.search(r"^decode steps after the first token\s+3\s+(\d+)$", out, flags=re.M)
    assert steps and 3 <= int(steps.group(1)) <= 3 * waves + 3, out
    engine_ms = re.search(r"^engine ms per decode step\s+([\d.]+)\s+([\d.]+)$", out, flags=re.M)
    assert engine_ms and float(engine_ms.group(1)) > 0 and float(engine_ms.group(2)) > 0, out
    assert re.search(r"^CPU s of the server / of the clients\s+[\d.]+/[\d.]+$", out, flags=re.M), out


def test_the_check_finds_lost_duplicated_and_mixed_up_answers():
    from tools.loadtest import check

    expected = {(1,): [5, 6], (2,): [7, 8]}
    good = [
        {"index": 0, "prompt": [1], "tokens": [5, 6], "finish": "length", "ids": {"a"}},
        {"index": 1, "prompt": [2], "tokens": [7, 8], "finish": "length", "ids": {"b"}},
    ]
    assert check(good, 2, expected, 2) == []
    assert check(good[:1], 2, expected, 2) == ["2 clients: 1 lost, 0 duplicated"]
    assert check(good + good[1:], 2, expected, 2)[:2] == [
        "2 clients: 0 lost, 1 duplicated",
        "2 clients: response ids repeat or one answer spans several ids",
    ]
    mixed = [good[0], {**good[1], "tokens": [5, 6]}]
    assert check(mixed, 2, expected, 2) == ["2 clients: 1 answers differ from generate on their prompt"]
