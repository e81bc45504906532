"""The needle (passkey) sweep (llama4_deploy/quality/needle.py, `eval --needle`) on a short grid: every trial's
prompt rebuilt and its answer recomputed with Engine.generate, the table and heatmap from the same trials."""

from __future__ import annotations

import json
import re

import pytest

from llama4_deploy.quality.needle import (
    ANSWER_TOKENS,
    Prompts,
    Sweep,
    Trial,
    answer_key,
    default_depths,
    default_lengths,
)
from tests.test_cli import invoke, user_error

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GRID = ["--lengths", "100,160,240", "--depth-steps", "3", "--trials", "2"]


def test_default_grid_doubles_to_the_context_and_straddles_the_chunk():
    lengths = default_lengths(max_context=16384, chunk=8192, answer_tokens=4, shortest=80)
    assert lengths == [256, 512, 1024, 2048, 4096, 8192, 8192 + 1024, 16380]
    assert default_depths() == [0.0, 0.25, 0.5, 0.75, 1.0]
    # the chunk (64) is shorter than the fixed pieces: only the length just past it and the full context
    assert default_lengths(max_context=256, chunk=64, answer_tokens=ANSWER_TOKENS, shortest=80) == [96, 249]


def test_answer_is_scored_by_exact_match_of_the_first_number():
    assert answer_key(" 58213. Remember") == "58213"
    assert answer_key(" 5821") == "5821" != "58213"
    assert answer_key(" 582134") != "58213"
    assert answer_key(" the pass key") is None


@pytest.fixture(scope="module")
def swept(trained_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("needle")
    result = invoke("eval", trained_bundle, "--needle", *GRID, "--compare", trained_bundle, "--out", out)
    assert result.exit_code == 0, result.output
    return result, out


def test_every_trial_is_the_engines_greedy_answer_to_its_prompt(swept, trained_engine):
    from llama4_deploy.runtime.tokenizer import load_tokenizer

    result, out = swept
    first, second = json.loads((out / "needle.json").read_text())
    assert first["lengths"] == [100, 160, 240] and first["depths"] == [0.0, 0.5, 1.0]
    assert len(first["trials"]) == 3 * 3 * 2
    assert len({t["key"] for t in first["trials"]}) == len(first["trials"])  # a key of its own per trial
    tokenizer = load_tokenizer(trained_engine.manifest)
    prompts = Prompts(tokenizer, open(first["haystack"]).read())
    built = []
    for record in first["trials"]:
        trial = Trial(**{k: record[k] for k in ("length", "depth", "trial", "key", "haystack_offset", "needle_at")})
        ids = prompts.build(trial)
        assert len(ids) == trial.length
        needle = prompts.needle(trial.key)
        assert ids[trial.needle_at : trial.needle_at + len(needle)] == needle
        assert trial.key in tokenizer.decode(needle)
        built.append(ids)
    generated = trained_engine.generate(built, ANSWER_TOKENS, temperature=0.0).tokens
    for record, tokens in zip(first["trials"], generated):
        assert record["answer"] == tokenizer.decode(tokens)
        assert record["correct"] == (answer_key(record["answer"]) == record["key"])
    # the comparison ran the same prompts on the second bundle (here the same one): the same answers
    assert [t["answer"] for t in second["trials"]] == [t["answer"] for t in first["trials"]]
    # the table's cells are the trials' accuracy
    cells = {}
    for record in first["trials"]:
        cells.setdefault((record["length"], record["depth"]), []).append(record["correct"])
    for length, row in zip(first["lengths"], first["accuracy"]):
        for depth, value in zip(first["depths"], row):
            assert value == pytest.approx(sum(cells[length, depth]) / 2)
        line = re.search(rf"^\s+{length}((?:\s+\d+)+)$", result.stdout, re.M)
        assert line, result.stdout
        assert [int(v) for v in line.group(1).split()][:3] == [round(v * 100) for v in row]
    assert re.search(r"^difference, .*\n.*\n\s+100\s+\+0\s+\+0\s+\+0\s+\+0$", result.stdout, re.M), result.stdout
    assert (out / "needle.png").read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in out.iterdir()) == ["needle.json", "needle.png"]
    # a record read back is the sweep that wrote it (make train-passkey draws each setting's heatmap from it)
    again = Sweep.from_record(first)
    assert again.record() == first and again.trials[0] == Trial(**first["trials"][0])


def test_needle_bad_input(trained_bundle, tmp_path):
    user_error(invoke("eval", trained_bundle, "--needle", "--lengths", "300"), "leave no room", "256")
    user_error(invoke("eval", trained_bundle, "--needle", "--lengths", "40"), "too short")
    user_error(invoke("eval", trained_bundle, "--needle", "--haystack", tmp_path / "none.txt"), "none.txt")
    (tmp_path / "file").write_text("x")
    user_error(invoke("eval", trained_bundle, "--needle", "--out", tmp_path / "file"), "not a directory")
    user_error(invoke("eval", trained_bundle, "--compare", trained_bundle), "--compare goes with --needle")
    user_error(invoke("eval", trained_bundle, "--needle", "--depth-steps", "1"), "at least 2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing written by a refused sweep
