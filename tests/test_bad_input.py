"""Bad input: each case gets one clear sentence, a non-zero exit, and leaves no partial bundle.

Checkpoints are written once per module by transformers (one sharded, one single-file) and
copied into each test's tmp_path before being damaged. Checkpoint problems are found before
tracing, so each failing build here takes well under a second.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from llama4_deploy.build import BuildError, build
from llama4_deploy.cli import main
from llama4_deploy.recipe import RECIPE_DIR, RecipeError
from llama4_deploy.runtime import load
from tests.conftest import write_checkpoint

INDEX = "model.safetensors.index.json"
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
Q_PROJ_SHAPE = [64, 64]  # tiny: num_heads 4 x head_dim 16 by hidden 64


# -- helpers ------------------------------------------------------------------------------------
def quiet(_message: str) -> None:
    pass


def single_sentence(message: str) -> None:
    """One line, one sentence: no newline, no second sentence, no traceback."""
    assert message and "\n" not in message, message
    assert "Traceback" not in message, message
    assert not re.search(r"[.!?]\s+[A-Z]", message), f"more than one sentence: {message!r}"


def assert_no_partial(out: Path) -> None:
    assert not out.exists(), f"{out} was created by a failing build"
    if out.parent.exists():
        leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(".") and "partial" in p.name]
        assert leftovers == [], f"partial bundle directories left behind: {leftovers}"
        assert list(out.parent.iterdir()) == [], f"unexpected files in {out.parent}: {list(out.parent.iterdir())}"


def build_fails(tmp_path: Path, exc_type, pattern: str, **kwargs) -> str:
    """Build through the Python API; it must raise `exc_type` with one sentence matching `pattern`."""
    out = tmp_path / "bundles" / "x"
    with pytest.raises(exc_type, match=pattern) as info:
        build(out=out, log=quiet, **kwargs)
    assert type(info.value) is exc_type  # not some other ValueError that happens to match
    message = str(info.value)
    single_sentence(message)
    assert_no_partial(out)
    return message


def cli_error(result, *words: str) -> str:
    """A user error on the CLI: exit 2, nothing on stdout, one `error: ...` sentence on stderr.

    Progress lines of the build (`[load] ...`) may precede it on stderr; nothing else may.
    """
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if not re.match(r"\[\w+\] ", line)]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert result.stderr.rstrip("\n").endswith(lines[0])  # the error is the last thing printed
    message = lines[0][len("error: "):]
    single_sentence(message)
    for word in words:
        assert word in message, (word, message)
    return message


def cli_build_fails(tmp_path: Path, *args: str, words: tuple[str, ...]) -> str:
    out = tmp_path / "cli-bundles" / "x"
    result = CliRunner().invoke(main, ["build", *args, "--out", str(out)])
    message = cli_error(result, *words)
    assert_no_partial(out)
    return message


def copy_checkpoint(source: Path, tmp_path: Path, name: str = "ck") -> Path:
    target = tmp_path / name
    shutil.copytree(source, target)
    return target


def weight_map(ck: Path) -> dict[str, str]:
    return json.loads((ck / INDEX).read_text())["weight_map"]


def edit_index(ck: Path, edit) -> None:
    index = json.loads((ck / INDEX).read_text())
    edit(index["weight_map"])
    (ck / INDEX).write_text(json.dumps(index, indent=2))


def rewrite_shard(shard: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


def truncate_half(path: Path) -> None:
    size = path.stat().st_size
    os.truncate(path, size // 2)
    assert path.stat().st_size == size // 2


def biggest_shard(ck: Path) -> Path:
    return max(ck.glob("model-*-of-*.safetensors"), key=lambda p: p.stat().st_size)


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    ck = write_checkpoint(tmp_path_factory.mktemp("bad-input") / "sharded", max_shard_size="200KB")
    assert (ck / INDEX).is_file() and len(list(ck.glob("model-*-of-*.safetensors"))) > 2
    return ck


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    ck = write_checkpoint(tmp_path_factory.mktemp("bad-input") / "single")
    assert (ck / "model.safetensors").is_file() and not (ck / INDEX).exists()
    return ck


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    with load(tiny_bundle) as engine:
        yield engine


# -- (a) a shard listed by the index is missing -------------------------------------------------
def test_missing_shard(sharded, tmp_path):
    ck = copy_checkpoint(sharded, tmp_path)
    shard = sorted(ck.glob("model-*-of-*.safetensors"))[1]
    shard.unlink()
    message = build_fails(tmp_path, BuildError, rf"^{INDEX} names shard {re.escape(shard.name)}, which is missing",
                          checkpoint=ck)
    assert str(ck.resolve()) in message


def test_missing_shard_cli(sharded, tmp_path):
    ck = copy_checkpoint(sharded, tmp_path)
    shard = sorted(ck.glob("model-*-of-*.safetensors"))[-1]
    shard.unlink()
    cli_build_fails(tmp_path, "--checkpoint", str(ck), words=(INDEX, f"names shard {shard.name}", "missing"))


# -- (b) the index names a file that does not exist ---------------------------------------------
def test_index_names_missing_file(sharded, tmp_path):
    ck = copy_checkpoint(sharded, tmp_path)
    edit_index(ck, lambda wm: wm.__setitem__(Q_PROJ, "nope.safetensors"))
    build_fails(tmp_path, BuildError, rf"^{INDEX} names shard nope\.safetensors, which is missing from ",
                checkpoint=ck)


# -- (c) a truncated safetensors file -----------------------------------------------------------
def _truncated_message_names(message: str, filename: str) -> None:
    # whichever stage notices (opening the file or reading a tensor), the file must be named
    assert filename in message, message
    assert re.search(r"not a readable safetensors file|cannot be read", message), message


def test_truncated_shard(sharded, tmp_path):
    ck = copy_checkpoint(sharded, tmp_path)
    shard = biggest_shard(ck)
    truncate_half(shard)
    message = build_fails(tmp_path, BuildError, re.escape(shard.name), checkpoint=ck)
    _truncated_message_names(message, shard.name)


def test_truncated_single_file(single, tmp_path):
    ck = copy_checkpoint(single, tmp_path)
    truncate_half(ck / "model.safetensors")
    message = build_fails(tmp_path, BuildError, r"model\.safetensors", checkpoint=ck)
    _truncated_message_names(message, "model.safetensors")


def test_truncated_shard_cli(sharded, tmp_path):
    ck = copy_checkpoint(sharded, tmp_path)
    shard = biggest_shard(ck)
    truncate_half(shard)
    message = cli_build_fails(tmp_path, "--checkpoint", str(ck), words=(shard.name,))
    _truncated_message_names(message, shard.name)


# -- (d) config.json is not a Llama 4 config ----------------------------------------------------
def _set_model_type(ck: Path, model_type: str) -> None:
    config = json.loads((ck / "config.json").read_text())
    config["model_type"] = model_type
    (ck / "config.json").write_text(json.dumps(config))


def test_wrong_model_type(sharded, tmp_path):
    ck = copy_checkpoint(sharded, tmp_path)
    _set_model_type(ck, "llama")
    build_fails(tmp_path, BuildError,
                r"^config\.json has model_type 'llama'; expected 'llama4_text' or 'llama4'", checkpoint=ck)


def test_wrong_model_type_cli(single, tmp_path):
    ck = copy_checkpoint(single, tmp_path)
    _set_model_type(ck, "llama")
    cli_build_fails(tmp_path, "--checkpoint", str(ck), words=("model_type 'llama'", "llama4_text"))


# -- (e) a tensor of the wrong shape ------------------------------------------------------------
def test_tensor_wrong_shape(sharded, tmp_path):
    import torch

    ck = copy_checkpoint(sharded, tmp_path)
    shard = ck / weight_map(ck)[Q_PROJ]
    rewrite_shard(shard, lambda t: t.__setitem__(Q_PROJ, torch.zeros(32, 64)))
    build_fails(tmp_path, BuildError,
                rf"^tensor {re.escape(Q_PROJ)} has shape \[32, 64\], config\.json implies {re.escape(str(Q_PROJ_SHAPE))}$",
                checkpoint=ck)


def test_tensor_wrong_shape_cli(single, tmp_path):
    import torch

    ck = copy_checkpoint(single, tmp_path)
    rewrite_shard(ck / "model.safetensors", lambda t: t.__setitem__(Q_PROJ, torch.zeros(64, 48)))
    cli_build_fails(tmp_path, "--checkpoint", str(ck), words=(Q_PROJ, "[64, 48]", str(Q_PROJ_SHAPE)))


# -- (f) a tensor is missing --------------------------------------------------------------------
def test_missing_tensor_index_still_lists_it(sharded, tmp_path):
    ck = copy_checkpoint(sharded, tmp_path)
    shard = ck / weight_map(ck)[Q_PROJ]
    rewrite_shard(shard, lambda t: t.pop(Q_PROJ))
    build_fails(tmp_path, BuildError,
                rf"^{re.escape(shard.name)} does not hold tensor {re.escape(Q_PROJ)}, though the index says it does$",
                checkpoint=ck)


def test_missing_tensor_index_consistent(sharded, tmp_path):
    ck = copy_checkpoint(sharded, tmp_path)
    shard = ck / weight_map(ck)[Q_PROJ]
    rewrite_shard(shard, lambda t: t.pop(Q_PROJ))
    edit_index(ck, lambda wm: wm.pop(Q_PROJ))
    build_fails(tmp_path, BuildError, rf"^tensor {re.escape(Q_PROJ)} is missing from the checkpoint", checkpoint=ck)


def test_missing_tensor_single_file(single, tmp_path):
    ck = copy_checkpoint(single, tmp_path)
    rewrite_shard(ck / "model.safetensors", lambda t: t.pop(Q_PROJ))
    build_fails(tmp_path, BuildError, rf"^tensor {re.escape(Q_PROJ)} is missing from the checkpoint", checkpoint=ck)


def test_missing_tensor_cli(sharded, tmp_path):
    ck = copy_checkpoint(sharded, tmp_path)
    shard = ck / weight_map(ck)[Q_PROJ]
    rewrite_shard(shard, lambda t: t.pop(Q_PROJ))
    cli_build_fails(tmp_path, "--checkpoint", str(ck), words=(Q_PROJ, shard.name))


# -- (g) unknown recipe keys --------------------------------------------------------------------
def _recipe_with(tmp_path: Path, name: str, edit) -> Path:
    import yaml

    data = yaml.safe_load((RECIPE_DIR / "tiny.yaml").read_text())
    edit(data)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_recipe_key(tmp_path):
    path = _recipe_with(tmp_path, "extra-top.yaml", lambda d: d.__setitem__("colour", "blue"))
    build_fails(tmp_path, RecipeError, r"^recipe extra-top\.yaml has unknown key 'colour'$", recipe=str(path))


def test_unknown_nested_recipe_key(tmp_path):
    path = _recipe_with(tmp_path, "extra-nested.yaml", lambda d: d["profiles"].__setitem__("max_batchez", 8))
    build_fails(tmp_path, RecipeError, r"^recipe extra-nested\.yaml has unknown key 'profiles\.max_batchez'$",
                recipe=str(path))


def test_unknown_recipe_key_cli(tmp_path):
    path = _recipe_with(tmp_path, "extra-nested.yaml", lambda d: d["profiles"].__setitem__("max_batchez", 8))
    cli_build_fails(tmp_path, "--recipe", str(path), words=("extra-nested.yaml", "unknown key 'profiles.max_batchez'"))


def test_the_valid_recipe_copy_loads(tmp_path):
    # the edits above are the only thing wrong with those recipes: an unedited copy is fine
    from llama4_deploy.recipe import load_recipe

    path = _recipe_with(tmp_path, "copy.yaml", lambda d: None)
    assert load_recipe(str(path)) == load_recipe("tiny")


# -- (k) a recipe that needs a checkpoint, without one ------------------------------------------
def test_scout_without_checkpoint(tmp_path):
    build_fails(tmp_path, BuildError, r"^recipe scout needs a checkpoint: .*--checkpoint DIR", recipe="scout")


def test_scout_without_checkpoint_cli(tmp_path):
    cli_build_fails(tmp_path, "--recipe", "scout", words=("recipe scout needs a checkpoint", "--checkpoint"))


# -- (k2) unknown lowering choices through the Python API (the CLI's choices reject them) ----------
def test_unknown_moe_dispatch(tmp_path):
    build_fails(tmp_path, BuildError, r"^unknown MoE dispatch 'sparse'; choose one of dense, ", moe_dispatch="sparse")


def test_unknown_attention_form(tmp_path):
    build_fails(tmp_path, BuildError, r"^unknown attention form 'flash'; choose one of decomposed, onnx23, auto$",
                attention="flash")


# -- (h) token id outside the vocabulary --------------------------------------------------------
@pytest.mark.parametrize("bad", [512, 10_000, -1])
def test_token_outside_vocab_generate(engine, bad):
    assert engine.vocab_size == 512
    with pytest.raises(ValueError, match=rf"^prompt 1 has token id {bad}, outside the vocabulary \[0, 512\)$") as info:
        engine.generate([[1, 2, 3], [4, bad, 5]], 4)
    single_sentence(str(info.value))


@pytest.mark.parametrize("bad", [512, -1])
def test_token_outside_vocab_score(engine, bad):
    for mode in ("prefill", "decode"):
        with pytest.raises(ValueError, match=rf"^sequence has token id {bad}, outside the vocabulary \[0, 512\)$"):
            engine.score([7, bad], mode=mode)


def test_token_outside_vocab_edge_is_accepted(engine):
    # 511 is the last valid id: the check must be `>= vocab`, not `> vocab - 2` or similar
    assert len(engine.generate([[0, 511]], 2).tokens[0]) >= 1


def test_token_outside_vocab_cli(tiny_bundle):
    result = CliRunner().invoke(main, ["run", str(tiny_bundle), "--ids", "1,2,512", "--max-new-tokens", "3"])
    message = cli_error(result, "token id 512", "outside the vocabulary [0, 512)")
    assert message.startswith("prompt 0 has token id 512")


# -- (i) prompt longer than the bundle's context ------------------------------------------------
def test_prompt_longer_than_context_generate(engine):
    assert engine.manifest.max_context == 128
    with pytest.raises(ValueError, match=r"^prompt 0 of 129 tokens plus 1 new ones exceeds the bundle's context "
                                         r"of 128 tokens$"):
        engine.generate([[1] * 129], 1)


def test_prompt_plus_new_tokens_longer_than_context(engine):
    with pytest.raises(ValueError, match=r"^prompt 1 of 120 tokens plus 9 new ones exceeds .* context of 128 tokens$"):
        engine.generate([[1, 2], [3] * 120], 9)
    # exactly the context is fine
    out = engine.generate([[1, 2], [3] * 120], 8, stop_tokens=[])
    assert [len(t) for t in out.tokens] == [8, 8]


def test_prompt_longer_than_context_score(engine):
    for mode in ("prefill", "decode"):
        with pytest.raises(ValueError, match=r"^sequence of 129 tokens plus 0 new ones exceeds the bundle's context "
                                             r"of 128 tokens$"):
            engine.score([5] * 129, mode=mode)
    assert engine.score([5] * 128, mode="prefill").shape == (128, 512)


def test_prompt_longer_than_context_cli(tiny_bundle):
    ids = ",".join(["3"] * 129)
    result = CliRunner().invoke(main, ["run", str(tiny_bundle), "--ids", ids, "--max-new-tokens", "2"])
    cli_error(result, "129 tokens plus 2 new ones", "context of 128 tokens")


# -- (j) empty prompt, empty prompt list ---------------------------------------------------------
def test_empty_prompt_generate(engine):
    with pytest.raises(ValueError, match=r"^prompt 1 is empty; give at least one token id$"):
        engine.generate([[1, 2], []], 3)


def test_empty_prompt_list_generate(engine):
    with pytest.raises(ValueError, match=r"^no prompts given; pass a list of token-id lists$"):
        engine.generate([], 3)


def test_empty_sequence_score(engine):
    for mode in ("prefill", "decode"):
        with pytest.raises(ValueError, match=r"^sequence is empty; give at least one token id$"):
            engine.score([], mode=mode)


@pytest.mark.parametrize("ids", ["", ","])
def test_empty_prompt_cli(tiny_bundle, ids):
    result = CliRunner().invoke(main, ["run", str(tiny_bundle), "--ids", ids, "--max-new-tokens", "2"])
    cli_error(result, "prompt 0 is empty")
