"""`llama4-deploy run` and `verify` through click's CliRunner, against the Python API."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from llama4_deploy.cli import main
from llama4_deploy.runtime import load


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def user_error(result, *words: str) -> str:
    """Exit 2, nothing on stdout, exactly one `error: <sentence>` line on stderr, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    message = lines[0][len("error: ") :]
    assert not re.search(r"[.!?]\s+[A-Z]", message), message
    for word in words:
        assert word in message, (word, message)
    return message


def test_run_ids_prints_greedy_tokens(tiny_bundle):
    result = invoke("run", tiny_bundle, "--ids", "1,2,3", "--max-new-tokens", "5")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    printed = result.stdout.strip()
    assert re.fullmatch(r"\d+(,\d+){4}", printed), printed
    with load(tiny_bundle) as engine:
        expected = engine.generate([[1, 2, 3]], 5).tokens[0]
    assert [int(t) for t in printed.split(",")] == expected


def test_run_ids_with_spaces_and_sampling_flags(tiny_bundle):
    result = invoke(
        "run", tiny_bundle, "--ids", "1, 2, 3", "--max-new-tokens", "4", "--temperature", "1.0", "--seed", "11"
    )
    assert result.exit_code == 0, result.output
    with load(tiny_bundle) as engine:
        expected = engine.generate([[1, 2, 3]], 4, temperature=1.0, seed=11).tokens[0]
    assert result.stdout.strip() == ",".join(map(str, expected))


def test_run_prompt_prints_words(checkpoint_bundle):
    result = invoke("run", checkpoint_bundle, "--prompt", "w5 w6 w7", "--max-new-tokens", "6")
    assert result.exit_code == 0, result.output
    words = result.stdout.strip().split(" ")
    assert all(re.fullmatch(r"w\d+", w) for w in words), words
    with load(checkpoint_bundle) as engine:
        expected = engine.generate([[5, 6, 7]], 6).tokens[0]  # the word tokenizer maps w<i> to i
    assert words == [f"w{t}" for t in expected]


@pytest.mark.parametrize("flags", [[], ["--prompt", "w1 w2", "--ids", "1,2"]], ids=["neither", "both"])
def test_run_needs_exactly_one_of_prompt_and_ids(tiny_bundle, flags):
    user_error(invoke("run", tiny_bundle, *flags), "exactly one of --prompt", "--ids")


def test_run_prompt_without_tokenizer(tiny_bundle):
    assert not (tiny_bundle / "tokenizer.json").exists()
    user_error(invoke("run", tiny_bundle, "--prompt", "hello"), "tokenizer.json", "--ids")


def test_run_ids_not_integers(tiny_bundle):
    user_error(invoke("run", tiny_bundle, "--ids", "1,two,3"), "--ids must be comma-separated integers", "'1,two,3'")


def test_run_not_a_bundle(tmp_path):
    user_error(invoke("run", tmp_path, "--ids", "1"), str(tmp_path), "is not a bundle", "manifest.json")


def test_verify_tiny_passes(tiny_bundle):
    result = invoke("verify", tiny_bundle)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "PASS"
    assert "FAIL" not in result.stdout
    assert sum(line.split()[0] in ("generate", "score:prefill", "score:decode") for line in lines[2:-1]) == 5


def test_verify_not_a_bundle(tmp_path):
    (tmp_path / "notes.txt").write_text("not a bundle\n")
    user_error(invoke("verify", tmp_path), str(tmp_path), "is not a bundle", "manifest.json")


def test_lint_bundle_clean(tiny_bundle):
    result = CliRunner().invoke(main, ["lint", str(tiny_bundle)])
    assert result.exit_code == 0, result.output
    assert all(line.endswith(": clean") for line in result.output.strip().splitlines())


def test_lint_flags_value_dependent_shape(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "ids"], ["y"], name="/bad/Reshape")],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    result = CliRunner().invoke(main, ["lint", str(path)])
    assert result.exit_code == 1
    assert "bad.onnx: 1 problem(s)" in result.output and "/bad/Reshape" in result.output and "ids" in result.output


def test_cost_table(tiny_bundle):
    result = CliRunner().invoke(main, ["cost", str(tiny_bundle)])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].split()[:3] == ["step", "graph", "GFLOP"]
    assert [line.split()[0] + " " + line.split()[1] for line in lines[1:]] == ["decode b1", "decode b4", "prefill 16"]


# -- profiles from the command line ---------------------------------------------------------------
def test_bare_checkpoint_takes_its_context_from_max_position_embeddings(checkpoint_bundle):
    from tests.conftest import manifest, tiny_config

    # tiny's max_position_embeddings (1024) is below the 32768 cap, so it is the context
    assert manifest(checkpoint_bundle)["profiles"]["max_context"] == tiny_config()["max_position_embeddings"] == 1024


def test_build_profile_flags_reach_the_manifest_and_the_runtime(tmp_path):
    out = tmp_path / "b"
    result = invoke(
        "build", "--recipe", "tiny", "--out", out, "--max-context", "48", "--max-batch", "2", "--prefill-tokens", "8"
    )
    assert result.exit_code == 0, result.output
    assert "at max context 48 x batch 2" in result.stdout  # the cache memory line
    from tests.conftest import manifest

    assert manifest(out)["profiles"] == {"max_context": 48, "max_batch": 2, "prefill_tokens": 8}
    with load(out) as engine:
        assert engine.generate([[1] * 40], 8, stop_tokens=[]).tokens[0]  # 48 tokens fit
        with pytest.raises(ValueError, match="exceeds the bundle's context of 48 tokens"):
            engine.generate([[1] * 41], 8)


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--max-context", "1"], ["--max-context", "1"]),
        (["--max-batch", "0"], ["--max-batch", "0"]),
        (["--prefill-tokens", "-3"], ["--prefill-tokens", "-3"]),
        (["--max-context", "4096"], ["4096", "max_position_embeddings", "1024"]),
    ],
)
def test_bad_profile_flags_are_one_sentence(tmp_path, flags, words):
    out = tmp_path / "b"
    result = invoke("build", "--recipe", "tiny", "--out", out, *flags)
    if flags[0] == "--max-context" and flags[1] == "4096":
        # found once the checkpoint's config is read: after the build's progress lines, before tracing
        assert result.exit_code == 2 and "Traceback" not in result.output
        last = result.stderr.splitlines()[-1]
        assert last.startswith("error: ") and all(word in last for word in words), last
    else:
        user_error(result, *words)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []
