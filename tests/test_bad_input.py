"""Bad input: each case gets one clear sentence, a non-zero exit, and leaves no partial bundle.

Checkpoints are written once per module by transformers (one sharded, one single-file) and
copied into each test's tmp_path before being damaged. Checkpoint problems are found before
tracing, so each failing build here takes well under a second.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from llama4_deploy.build import BuildError, build
from llama4_deploy.build.recipe import RECIPE_DIR, RecipeError
from llama4_deploy.cli import main
from llama4_deploy.runtime import abi, load
from tests.conftest import tiny_config, write_checkpoint

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
    message = lines[0][len("error: ") :]
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
    message = build_fails(
        tmp_path, BuildError, rf"^{INDEX} names shard {re.escape(shard.name)}, which is missing", checkpoint=ck
    )
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
    build_fails(tmp_path, BuildError, rf"^{INDEX} names shard nope\.safetensors, which is missing from ", checkpoint=ck)


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
    build_fails(
        tmp_path, BuildError, r"^config\.json has model_type 'llama'; expected 'llama4_text' or 'llama4'", checkpoint=ck
    )


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
    implied = re.escape(str(Q_PROJ_SHAPE))
    build_fails(
        tmp_path,
        BuildError,
        rf"^tensor {re.escape(Q_PROJ)} has shape \[32, 64\], config\.json implies {implied}$",
        checkpoint=ck,
    )


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
    missing = rf"^{re.escape(shard.name)} does not hold tensor {re.escape(Q_PROJ)}, though the index says it does$"
    build_fails(tmp_path, BuildError, missing, checkpoint=ck)


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
    build_fails(
        tmp_path, RecipeError, r"^recipe extra-nested\.yaml has unknown key 'profiles\.max_batchez'$", recipe=str(path)
    )


def test_unknown_recipe_key_cli(tmp_path):
    path = _recipe_with(tmp_path, "extra-nested.yaml", lambda d: d["profiles"].__setitem__("max_batchez", 8))
    cli_build_fails(tmp_path, "--recipe", str(path), words=("extra-nested.yaml", "unknown key 'profiles.max_batchez'"))


def test_the_valid_recipe_copy_loads(tmp_path):
    # the edits above are the only thing wrong with those recipes: an unedited copy is fine
    from llama4_deploy.build.recipe import load_recipe

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
    build_fails(
        tmp_path,
        BuildError,
        r"^unknown attention form 'flash'; choose one of decomposed, onnx23, gqa, auto$",
        attention="flash",
    )


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
    with pytest.raises(
        ValueError,
        match=r"^prompt 0 of 129 tokens plus 1 new ones exceeds the bundle's context "
        r"of 128 tokens$",
    ):
        engine.generate([[1] * 129], 1)


def test_prompt_plus_new_tokens_longer_than_context(engine):
    with pytest.raises(ValueError, match=r"^prompt 1 of 120 tokens plus 9 new ones exceeds .* context of 128 tokens$"):
        engine.generate([[1, 2], [3] * 120], 9)
    # exactly the context is fine
    out = engine.generate([[1, 2], [3] * 120], 8, stop_tokens=[])
    assert [len(t) for t in out.tokens] == [8, 8]


def test_prompt_longer_than_context_score(engine):
    for mode in ("prefill", "decode"):
        with pytest.raises(
            ValueError,
            match=r"^sequence of 129 tokens plus 0 new ones exceeds the bundle's context "
            r"of 128 tokens$",
        ):
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


# =================================================================================================
# The catalog (issue 8): damaged bundles, bad arguments, bad recipes, checkpoints and --out dirs.
# Each case asserts exit status 2, one `error: <sentence>` line naming the problem, no traceback,
# and nothing left on disk (the test's directory is byte-for-byte as it was before the command).
# Bundle cases damage a copy of the one session bundle (`tiny_bundle`); commands run in-process.
# =================================================================================================

LAYER_GLOBAL, LAYER_CHUNKED = 3, 0  # tiny: layers 0-2 are chunked (RoPE), layer 3 is global (NoPE)


def snapshot(root: Path) -> list[tuple[str, int, int]]:
    return sorted(
        (str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns if p.is_file() else 0)
        for p in root.rglob("*")
    )


def edit_manifest(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def damage(bundle: Path) -> None:
        path = bundle / "manifest.json"
        raw = json.loads(path.read_text())
        edit(raw)
        path.write_text(json.dumps(raw))

    return damage


def write_manifest_text(text: str | bytes) -> Callable[[Path], None]:
    def damage(bundle: Path) -> None:
        path = bundle / "manifest.json"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())

    return damage


def remove(name: str) -> Callable[[Path], None]:
    return lambda bundle: (bundle / name).unlink()


def truncate(name: str) -> Callable[[Path], None]:
    return lambda bundle: truncate_half(bundle / name)


def flip_byte(name: str, where: float, mask: int = 0xFF) -> Callable[[Path], None]:
    """XOR one byte at a relative position (for weights.data: byte 3 of a float32 holds the exponent)."""

    def damage(bundle: Path) -> None:
        path = bundle / name
        data = bytearray(path.read_bytes())
        at = int(len(data) * where) // 4 * 4 + (3 if mask == 0x40 else 0)
        data[at] ^= mask
        path.write_bytes(bytes(data))

    return damage


def fill_nan(bundle: Path) -> None:
    size = (bundle / "weights.data").stat().st_size
    (bundle / "weights.data").write_bytes(np.full(size // 4, np.nan, dtype=np.float32).tobytes())


def graph_from_another_layout(bundle: Path) -> None:
    """native.onnx as another bundle would have saved it: two same-shaped weights trade places in
    weights.data, and the graph carries the fingerprint of that layout."""
    import onnx

    from llama4_deploy.runtime.integrity import LAYOUT_KEY, layout_fingerprint

    model = onnx.load(bundle / "native.onnx", load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    by_shape: dict[tuple, list] = {}
    for tensor in external:
        by_shape.setdefault((tensor.data_type, tuple(tensor.dims)), []).append(tensor)
    first, second = next(group for group in by_shape.values() if len(group) >= 2)[:2]
    offsets = {t.name: {e.key: e for e in t.external_data} for t in (first, second)}
    a, b = offsets[first.name]["offset"], offsets[second.name]["offset"]
    a.value, b.value = b.value, a.value
    info = lambda t: {e.key: e.value for e in t.external_data}  # noqa: E731
    layout = layout_fingerprint(
        (
            t.name,
            int(info(t).get("offset", 0)),
            int(info(t)["length"]),
            onnx.TensorProto.DataType.Name(t.data_type),
            tuple(t.dims),
        )
        for t in external
    )
    for prop in model.metadata_props:
        if prop.key == LAYOUT_KEY:
            prop.value = layout
    onnx.save(model, bundle / "native.onnx")


def strip_fingerprint(bundle: Path) -> None:
    import onnx

    model = onnx.load(bundle / "native.onnx", load_external_data=False)
    del model.metadata_props[:]
    onnx.save(model, bundle / "native.onnx")


def set_layer(layer: int, **fields) -> Callable[[Path], None]:
    return edit_manifest(lambda m: m["layers"][layer].update(fields))


def set_key(dotted: str, value) -> Callable[[dict], None]:
    def edit(raw: dict) -> None:
        *parents, last = dotted.split(".")
        node = raw
        for part in parents:
            node = node[part]
        node[last] = value

    return edit


def drop_key(dotted: str) -> Callable[[dict], None]:
    def edit(raw: dict) -> None:
        *parents, last = dotted.split(".")
        node = raw
        for part in parents:
            node = node[part]
        del node[last]

    return edit


RUN = ["run", "{b}", "--ids", "1,2,3", "--max-new-tokens", "2"]
RUN_UNCHECKED = [*RUN, "--no-verify-files"]  # hashes skipped: the other checks must still hold
VERIFY = ["verify", "{b}"]
FILES = ["verify", "--files", "{b}"]
COST = ["cost", "{b}"]
LINT = ["lint", "{b}"]
UNLOADABLE = ("native.onnx", "cannot be loaded by ONNX Runtime")


@dataclasses.dataclass(frozen=True)
class BundleCase:
    id: str
    damage: Callable[[Path], None] | None  # None: the bundle is fine, the arguments are not
    command: list[str]
    words: tuple[str, ...]  # what the one sentence must name


BUNDLE_CASES = [
    # the manifest itself (finding 6)
    BundleCase("no-manifest-run", remove("manifest.json"), RUN, ("is not a bundle", "manifest.json")),
    BundleCase("no-manifest-cost", remove("manifest.json"), COST, ("is not a bundle", "manifest.json")),
    BundleCase("manifest-not-json", write_manifest_text("{not json"), VERIFY, ("manifest.json", "not valid JSON")),
    BundleCase("manifest-not-utf8", write_manifest_text(b"\xff\xfe{}"), RUN, ("manifest.json", "not valid JSON")),
    BundleCase("manifest-is-list-run", write_manifest_text("[1, 2]"), RUN, ("manifest.json", "JSON array")),
    BundleCase("manifest-is-list-cost", write_manifest_text("[]"), COST, ("manifest.json", "JSON array")),
    BundleCase("manifest-is-null", write_manifest_text("null"), FILES, ("manifest.json", "JSON null")),
    BundleCase(
        "manifest-old-format", edit_manifest(set_key("format_version", 1)), RUN, ("format_version 1", "rebuild")
    ),
    BundleCase("no-engine-run", edit_manifest(drop_key("engine")), RUN, ("has no engine",)),
    BundleCase("no-engine-cost", edit_manifest(drop_key("engine")), COST, ("has no engine",)),
    BundleCase("no-profiles", edit_manifest(drop_key("profiles")), RUN, ("has no profiles",)),
    BundleCase("no-head-dim-run", edit_manifest(drop_key("model.head_dim")), RUN, ("has no model.head_dim",)),
    BundleCase("no-head-dim-verify", edit_manifest(drop_key("model.head_dim")), VERIFY, ("has no model.head_dim",)),
    BundleCase(
        "head-dim-not-int",
        edit_manifest(set_key("model.head_dim", "16")),
        RUN,
        ("model.head_dim must be an integer", "'16'"),
    ),
    BundleCase(
        "max-batch-zero",
        edit_manifest(set_key("profiles.max_batch", 0)),
        RUN,
        ("profiles.max_batch must be at least 1",),
    ),
    BundleCase("layer-dropped", edit_manifest(lambda m: m["layers"].pop()), RUN, ("lists 3 layers", "num_layers is 4")),
    BundleCase("layer-attention-unknown", set_layer(1, attention="sliding"), RUN, ("layer 1", "'sliding'")),
    BundleCase("layer-index-wrong", set_layer(2, index=7), RUN, ("layers[2]", "index 2")),
    BundleCase(
        "no-weights-layout", edit_manifest(drop_key("engine.weights_layout")), RUN, ("has no engine.weights_layout",)
    ),
    BundleCase(
        "no-prefill-graph", edit_manifest(drop_key("engine.graphs.prefill")), RUN, ("no engine.graphs.prefill",)
    ),
    BundleCase(
        "graph-outside-bundle",
        edit_manifest(set_key("engine.graphs.decode.file", "../native.onnx")),
        RUN,
        ("engine.graphs.decode", "inside the bundle"),
    ),
    BundleCase(
        "overflow-without-exact",
        edit_manifest(set_key("engine.graphs.prefill.reports_overflow", True)),
        RUN,
        ("reports overflow", "no exact graph"),
    ),
    BundleCase(
        "files-not-recorded",
        edit_manifest(lambda m: m["files"].pop("weights.data")),
        RUN,
        ("records no hash for weights.data",),
    ),
    BundleCase(
        "files-record-incomplete",
        edit_manifest(lambda m: m["files"]["golden.npz"].pop("sha256")),
        FILES,
        ("files.golden.npz", "size and sha256"),
    ),
    BundleCase(
        "files-outside-bundle",
        edit_manifest(lambda m: m["files"].update({"../x": {"size": 1, "sha256": "0"}})),
        FILES,
        ("'../x'", "not a file inside the bundle"),
    ),
    BundleCase(
        "backend-tensorrt",
        edit_manifest(set_key("engine.backend", "tensorrt")),
        RUN,
        ("targets tensorrt", "onnxruntime"),
    ),
    BundleCase(
        "tokenizer-unrecorded",
        edit_manifest(set_key("tokenizer", "tokenizer.json")),
        RUN,
        ("records no hash for tokenizer.json",),
    ),
    # the manifest disagrees with the graph (finding 3): refused even with the hashes skipped
    BundleCase(
        "global-layer-marked-chunked",
        set_layer(LAYER_GLOBAL, attention="chunked", cache_slots=8),
        RUN,
        ("marks layer 3 chunked", abi.past_key(3), "global cache"),
    ),
    BundleCase(
        "global-layer-marked-chunked-verify",
        set_layer(LAYER_GLOBAL, attention="chunked", cache_slots=8),
        VERIFY,
        ("marks layer 3 chunked",),
    ),
    BundleCase(
        "chunked-layer-marked-global",
        set_layer(LAYER_CHUNKED, attention="global", cache_slots=None),
        RUN_UNCHECKED,
        ("marks layer 0 global", "chunked ring"),
    ),
    BundleCase(
        "ring-size-changed", set_layer(1, cache_slots=16), RUN, ("attends chunks of 8", "ring of 16 slots", "layer 1")
    ),
    BundleCase(
        "kv-heads-changed", edit_manifest(set_key("model.num_kv_heads", 4)), RUN, (abi.past_key(0), "[batch, 4,")
    ),
    BundleCase("head-dim-changed", edit_manifest(set_key("model.head_dim", 32)), RUN, (abi.past_key(0), ", 32]")),
    BundleCase("vocab-changed", edit_manifest(set_key("model.vocab_size", 1000)), RUN, (abi.LOGITS, "1000")),
    BundleCase(
        "input-unlisted",
        edit_manifest(lambda m: m["engine"]["inputs"].remove(abi.PAST_LENGTHS)),
        RUN,
        ("inputs that disagree", abi.PAST_LENGTHS),
    ),
    BundleCase(
        "output-extra",
        edit_manifest(lambda m: m["engine"]["outputs"].append(abi.present_key(9))),
        RUN,
        ("outputs that disagree", abi.present_key(9)),
    ),
    BundleCase(
        "cache-dtype-changed",
        edit_manifest(set_key("engine.cache_dtype", "float16")),
        RUN,
        (abi.past_key(0), "float16"),
    ),
    # files changed after the build (finding 2)
    BundleCase("weights-exponent-byte", flip_byte("weights.data", 0.5, 0x40), RUN, ("weights.data", "changed")),
    BundleCase("weights-mantissa-byte", flip_byte("weights.data", 0.3, 0x01), RUN, ("weights.data", "changed")),
    BundleCase("weights-byte-verify", flip_byte("weights.data", 0.7, 0x01), VERIFY, ("weights.data", "changed")),
    BundleCase("weights-byte-files", flip_byte("weights.data", 0.9, 0x01), FILES, ("weights.data", "changed")),
    BundleCase("weights-truncated", truncate("weights.data"), RUN, ("weights.data", "truncated")),
    BundleCase("weights-truncated-files", truncate("weights.data"), FILES, ("weights.data", "truncated")),
    BundleCase("weights-truncated-unchecked", truncate("weights.data"), RUN_UNCHECKED, UNLOADABLE),
    BundleCase("weights-missing", remove("weights.data"), RUN, ("missing weights.data",)),
    BundleCase("weights-missing-verify", remove("weights.data"), VERIFY, ("missing weights.data",)),
    BundleCase("weights-nan-unchecked", fill_nan, RUN_UNCHECKED, ("NaN or Inf logits", "allow_non_finite")),
    BundleCase("graph-missing-run", remove("native.onnx"), RUN, ("missing native.onnx",)),
    BundleCase("graph-missing-unchecked", remove("native.onnx"), RUN_UNCHECKED, ("missing native.onnx",)),
    BundleCase("graph-missing-cost", remove("native.onnx"), COST, ("missing native.onnx",)),
    BundleCase("graph-missing-lint", remove("native.onnx"), LINT, ("neither an ONNX file", "bundle directory")),
    BundleCase("graph-truncated-run", truncate("native.onnx"), RUN, ("native.onnx", "truncated")),
    BundleCase("graph-truncated-cost", truncate("native.onnx"), COST, ("native.onnx", "truncated")),
    BundleCase("graph-truncated-lint", truncate("native.onnx"), LINT, ("native.onnx", "cannot be read as ONNX")),
    BundleCase("graph-truncated-unchecked", truncate("native.onnx"), RUN_UNCHECKED, UNLOADABLE),
    BundleCase("graph-other-layout", graph_from_another_layout, RUN, ("native.onnx", "changed")),
    BundleCase(
        "graph-other-layout-unchecked",
        graph_from_another_layout,
        RUN_UNCHECKED,
        ("native.onnx", "different weights.data layout"),
    ),
    BundleCase(
        "graph-no-fingerprint-unchecked",
        strip_fingerprint,
        RUN_UNCHECKED,
        ("native.onnx", "no weight-layout fingerprint"),
    ),
    BundleCase("golden-changed", flip_byte("golden.npz", 0.5), FILES, ("golden.npz", "changed")),
    # verify needs the bundle's source
    BundleCase("source-missing", edit_manifest(drop_key("source")), VERIFY, ("no usable source record",)),
    BundleCase(
        "source-checkpoint-gone",
        edit_manifest(set_key("source", {"kind": "checkpoint", "path": "/nonexistent"})),
        VERIFY,
        ("source checkpoint /nonexistent is gone",),
    ),
    BundleCase(
        "tokenizer-damaged-unchecked",
        lambda b: [
            (b / "tokenizer.json").write_text("{broken"),
            edit_manifest(set_key("tokenizer", "tokenizer.json"))(b),
            edit_manifest(lambda m: m["files"].update({"tokenizer.json": {"size": 7, "sha256": "0"}}))(b),
        ],
        ["run", "{b}", "--prompt", "w1 w2", "--no-verify-files"],
        ("tokenizer.json", "not a readable tokenizer"),
    ),
    BundleCase(
        "verify-settings-damaged",
        edit_manifest(set_key("verify", {"prompt_lengths": "19"})),
        VERIFY,
        ("verify must hold", "prompt_lengths"),
    ),
    BundleCase(
        "eos-not-integers",
        edit_manifest(set_key("model.eos_token_ids", "143")),
        RUN,
        ("model.eos_token_ids", "list of integers"),
    ),
    BundleCase(
        "inputs-not-names",
        edit_manifest(lambda m: m["engine"]["inputs"].append({"x": 1})),
        RUN,
        ("engine.inputs", "list of names"),
    ),
    # not a bundle at all
    BundleCase(
        "bundle-is-a-file",
        lambda b: (b / "weights.data").rename(b.parent / "file"),
        ["run", "{b}/../file", "--ids", "1"],
        ("is not a bundle",),
    ),
    BundleCase("bundle-does-not-exist", None, ["cost", "{b}/nope"], ("nope", "is not a bundle")),
    # bad arguments to run (finding 7)
    BundleCase("threads-zero", None, [*RUN, "--threads", "0"], ("threads is 0", "at least 1")),
    BundleCase("threads-negative", None, ["verify", "{b}", "--threads", "-3"], ("threads is -3",)),
    BundleCase("temperature-negative", None, [*RUN, "--temperature", "-1"], ("temperature is -1.0",)),
    BundleCase("temperature-nan", None, [*RUN, "--temperature", "nan"], ("temperature is nan", "finite")),
    BundleCase("temperature-inf", None, [*RUN, "--temperature", "inf"], ("temperature is inf", "finite")),
    BundleCase("top-p-zero", None, [*RUN, "--top-p", "0"], ("top_p is 0.0", "(0, 1]")),
    BundleCase("top-p-above-one", None, [*RUN, "--top-p", "1.5"], ("top_p is 1.5",)),
    BundleCase("max-new-tokens-zero", None, [*RUN[:-1], "0"], ("max_new_tokens is 0",)),
    BundleCase("seed-negative", None, [*RUN, "--seed", "-1"], ("seed is -1",)),
    BundleCase("ids-floats", None, ["run", "{b}", "--ids", "1.7,2.2"], ("--ids must be comma-separated integers",)),
]


@pytest.mark.parametrize("case", BUNDLE_CASES, ids=[c.id for c in BUNDLE_CASES])
def test_catalog_bundle(case, tiny_bundle, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    if case.damage is not None:
        case.damage(bundle)
    before = snapshot(tmp_path)
    args = [a.replace("{b}", str(bundle)) for a in case.command]
    result = CliRunner().invoke(main, args)
    cli_error(result, *case.words)
    assert snapshot(tmp_path) == before, "the command changed or left files on disk"


def test_catalog_is_large_and_distinct():
    cases = BUNDLE_CASES + BUILD_CASES + API_CASES + HARDENED_BUILD_CASES + HARDENED_BUNDLE_CASES + SERVER_CASES
    assert len({c.id for c in cases}) == len(cases) >= 200


# -- builds: --out policy, lock, recipes, checkpoints (exit 2 before any tracing) ------------------
def _lock_held(tmp_path: Path) -> list[str]:
    fd = os.open(tmp_path / ".x.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a running build holds it; released when the test ends
    tmp_path.joinpath("held-fd").write_text(str(fd))
    return ["--recipe", "tiny"]


def _recipe(tmp_path: Path, edit, text: str | None = None) -> list[str]:
    path = tmp_path / "r.yaml"
    if text is not None:
        path.write_text(text)
    else:
        path = _recipe_with(tmp_path, "r.yaml", edit)
    return ["--recipe", str(path)]


def _checkpoint(tmp_path: Path, config_text: str | None) -> list[str]:
    ck = tmp_path / "ck"
    ck.mkdir()
    if config_text is not None:
        (ck / "config.json").write_text(config_text)
    return ["--checkpoint", str(ck)]


def _out_with(tmp_path: Path, make) -> None:
    make(tmp_path / "x")


@dataclasses.dataclass(frozen=True)
class BuildCase:
    id: str
    prepare: Callable[[Path], list[str]]  # makes what the case needs under tmp_path, returns extra args
    words: tuple[str, ...]


def _keep_dir(tmp_path: Path) -> list[str]:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("hi\n")
    return ["--recipe", "tiny"]


def _bundle_plus(tmp_path: Path, tiny_bundle: Path) -> list[str]:
    shutil.copytree(tiny_bundle, tmp_path / "x")
    (tmp_path / "x" / "notes.txt").write_text("mine\n")
    return ["--recipe", "tiny"]


def _foreign_manifest(tmp_path: Path) -> list[str]:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "manifest.json").write_text('{"format_version": 1}')
    return ["--recipe", "tiny"]


BUILD_CASES = [
    BuildCase("out-not-a-bundle", _keep_dir, ("--out", "not a bundle written by llama4-deploy", "--force")),
    BuildCase(
        "out-is-a-file", lambda t: (t.joinpath("x").write_text("x"), ["--recipe", "tiny"])[1], ("--out", "is a file")
    ),
    BuildCase(
        "out-is-a-file-forced",
        lambda t: (t.joinpath("x").write_text("x"), ["--recipe", "tiny", "--force"])[1],
        ("--out", "is a file"),
    ),
    BuildCase("out-bundle-plus-user-file", None, ("also holds notes.txt", "--force")),  # prepared in the test
    BuildCase(
        "out-under-a-file",
        lambda t: (t.joinpath("f").write_text("x"), ["--out", str(t / "f" / "x")])[1],
        ("cannot be created", "is a file"),
    ),
    BuildCase("out-foreign-manifest", _foreign_manifest, ("not a bundle written by llama4-deploy",)),
    BuildCase(
        "out-holds-checkpoint",
        lambda t: [*_checkpoint(t, "{}"), "--out", str(t / "ck"), "--force"],
        ("holds the checkpoint",),
    ),
    BuildCase("out-locked", _lock_held, ("another build is writing", ".x.lock")),
    BuildCase(
        "recipe-config-typo",
        lambda t: _recipe(t, lambda d: d["random"]["config"].update(attention_chunk_sizee=8)),
        ("random.config", "'attention_chunk_sizee'", "'attention_chunk_size'"),
    ),
    BuildCase("recipe-yaml-list", lambda t: _recipe(t, None, "- 1\n- 2\n"), ("r.yaml", "not a mapping")),
    BuildCase("recipe-invalid-yaml", lambda t: _recipe(t, None, "name: [unclosed\n"), ("r.yaml", "not valid YAML")),
    BuildCase(
        "recipe-max-batch-zero",
        lambda t: _recipe(t, lambda d: d["profiles"].update(max_batch=0)),
        ("profiles.max_batch", "greater than or equal to 1"),
    ),
    BuildCase(
        "recipe-unknown-dispatch", lambda t: _recipe(t, lambda d: d.update(moe_dispatch="sparse")), ("moe_dispatch",)
    ),
    BuildCase("recipe-missing", lambda t: ["--recipe", "no-such-recipe"], ("no recipe 'no-such-recipe'",)),
    BuildCase("checkpoint-dir-missing", lambda t: ["--checkpoint", str(t / "nowhere")], ("nowhere", "does not exist")),
    BuildCase("checkpoint-no-config", lambda t: _checkpoint(t, None), ("no config.json",)),
    BuildCase("checkpoint-config-not-json", lambda t: _checkpoint(t, "{oops"), ("config.json", "not valid JSON")),
    BuildCase("checkpoint-config-is-list", lambda t: _checkpoint(t, "[]"), ("config.json", "not a JSON object")),
]


@pytest.mark.parametrize("case", BUILD_CASES, ids=[c.id for c in BUILD_CASES])
def test_catalog_build(case, tiny_bundle, tmp_path):
    args = _bundle_plus(tmp_path, tiny_bundle) if case.prepare is None else case.prepare(tmp_path)
    if "--out" not in args:
        args = [*args, "--out", str(tmp_path / "x")]
    before = snapshot(tmp_path)
    try:
        result = CliRunner().invoke(main, ["build", *args])
    finally:
        if (tmp_path / "held-fd").exists():
            os.close(int((tmp_path / "held-fd").read_text()))
    cli_error(result, *case.words)
    assert snapshot(tmp_path) == before, "the build changed or left files on disk"


def test_out_not_a_bundle_keeps_its_file(tmp_path):
    # finding 1, Python API: the directory and its file survive, and nothing else appears
    _keep_dir(tmp_path)
    with pytest.raises(BuildError, match=r"not a bundle written by llama4-deploy; pass --force"):
        build("tiny", out=tmp_path / "x", log=quiet)
    assert (tmp_path / "x" / "f").read_text() == "hi\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


# -- the Python API: TypeError / ValueError with one sentence ------------------------------------
@dataclasses.dataclass(frozen=True)
class ApiCase:
    id: str
    call: Callable  # (engine, bundle) -> None; must raise
    error: type
    pattern: str


API_CASES = [
    ApiCase(
        "ids-float",
        lambda e, b: e.generate([[1.7, 2.2]], 2),
        TypeError,
        r"^prompt 0 has token id 1\.7 of type float; token ids must be integers$",
    ),
    ApiCase("ids-numpy-float", lambda e, b: e.score(np.array([1.0, 2.0])), TypeError, r"token ids must be integers"),
    ApiCase("ids-bool", lambda e, b: e.generate([[True, 2]], 2), TypeError, r"token id True of type bool"),
    ApiCase("ids-string", lambda e, b: e.score("143"), TypeError, r"^sequence must be a list of integer token ids"),
    ApiCase("ids-2d-array", lambda e, b: e.score(np.array([[1, 2]])), TypeError, r"shape \[1, 2\]"),
    ApiCase("prompts-flat", lambda e, b: e.generate([1, 2, 3], 2), TypeError, r"^prompt 0 is the integer 1"),
    ApiCase("prompts-string", lambda e, b: e.generate("1 2 3", 2), TypeError, r"^prompts must be a list"),
    ApiCase(
        "stop-tokens-string",
        lambda e, b: e.generate([[1]], 2, stop_tokens="143"),
        TypeError,
        r"^stop_tokens must be a list of integer token ids, got '143'$",
    ),
    ApiCase(
        "stop-token-outside-vocab",
        lambda e, b: e.generate([[1]], 2, stop_tokens=[600]),
        ValueError,
        r"^stop_tokens has token id 600, outside the vocabulary",
    ),
    ApiCase(
        "temperature-negative-api",
        lambda e, b: e.generate([[1]], 2, temperature=-1),
        ValueError,
        r"^temperature is -1\.0; it must be 0 \(greedy\) or more$",
    ),
    ApiCase(
        "temperature-string",
        lambda e, b: e.generate([[1]], 2, temperature="0.7"),
        TypeError,
        r"^temperature must be a number",
    ),
    ApiCase("top-p-nan", lambda e, b: e.generate([[1]], 2, top_p=float("nan")), ValueError, r"^top_p is nan"),
    ApiCase("seed-float", lambda e, b: e.generate([[1]], 2, seed=1.5), TypeError, r"^seed must be an integer"),
    ApiCase(
        "max-new-tokens-float",
        lambda e, b: e.generate([[1]], 2.0),
        TypeError,
        r"^max_new_tokens must be an integer, got 2\.0",
    ),
    ApiCase("max-new-tokens-bool", lambda e, b: e.generate([[1]], True), TypeError, r"^max_new_tokens must be"),
    ApiCase(
        "return-logits-string",
        lambda e, b: e.generate([[1]], 2, return_logits="yes"),
        TypeError,
        r"^return_logits must be True or False",
    ),
    ApiCase("score-mode-unknown", lambda e, b: e.score([1, 2], mode="beam"), ValueError, r"^mode is 'beam'"),
    ApiCase("load-threads-zero", lambda e, b: load(b, threads=0), ValueError, r"^threads is 0; it must be at least 1$"),
    ApiCase("load-threads-string", lambda e, b: load(b, threads="2"), TypeError, r"^threads must be an integer"),
    ApiCase("load-not-a-path", lambda e, b: load(123), TypeError, r"^bundle_dir must be a path"),
]


@pytest.mark.parametrize("case", API_CASES, ids=[c.id for c in API_CASES])
def test_catalog_api(case, engine, tiny_bundle):
    with pytest.raises(case.error, match=case.pattern) as info:
        case.call(engine, tiny_bundle)
    assert type(info.value) in (case.error, *case.error.__subclasses__())
    single_sentence(str(info.value))


def test_numpy_integer_ids_are_accepted(engine):
    # the strict checks take numpy integers (what tokenizers and arrays give) and change nothing
    expected = engine.generate([[1, 2, 3]], 3, stop_tokens=[])
    got = engine.generate(
        [np.array([1, 2, 3], dtype=np.int32)], np.int64(3), stop_tokens=np.array([], dtype=np.int64), seed=np.int64(0)
    )
    assert got.tokens == expected.tokens


# -- findings as tests ----------------------------------------------------------------------------
def test_global_layer_marked_chunked_is_refused_in_python(tiny_bundle, tmp_path):
    # finding 3: without the check this bundle loads and its logits are off by ~8 (greedy tokens change)
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    set_layer(LAYER_GLOBAL, attention="chunked", cache_slots=8)(bundle)
    from llama4_deploy.runtime import BundleError

    with pytest.raises(
        BundleError,
        match=r"^the manifest marks layer 3 chunked, but native\.onnx in .* declares "
        rf"{re.escape(abi.past_key(3))} as a global cache \('context' slots\)$",
    ):
        load(bundle, verify_files=False)


def test_file_check_can_be_skipped(tiny_bundle, tmp_path, monkeypatch):
    # a changed mantissa byte: refused by default; the documented switches skip the hash check
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    flip_byte("weights.data", 0.3, 0x01)(bundle)
    from llama4_deploy.runtime import BundleError

    with pytest.raises(BundleError, match=r"^weights\.data in .* has changed since the build"):
        load(bundle)
    with load(bundle, verify_files=False) as engine:
        assert len(engine.generate([[1, 2]], 2).tokens[0]) >= 1
    monkeypatch.setenv("LLAMA4_DEPLOY_VERIFY_FILES", "0")
    load(bundle).close()
    result = CliRunner().invoke(main, ["verify", "--files", str(tiny_bundle)])
    assert result.exit_code == 0 and re.match(r"^3 files \(1\.\d MB\): sizes and SHA-256 match", result.stdout)


def test_non_finite_logits_can_be_allowed(tiny_bundle, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    fill_nan(bundle)
    from llama4_deploy.runtime import NonFiniteLogitsError

    with load(bundle, verify_files=False) as engine, pytest.raises(NonFiniteLogitsError, match=r"at step 1;"):
        engine.score([1, 2, 3])
    with load(bundle, verify_files=False, allow_non_finite=True) as engine:
        assert np.isnan(engine.score([1, 2, 3])).all()


def test_checkpoint_tokenizer_damaged(single, tmp_path):
    ck = copy_checkpoint(single, tmp_path)
    (ck / "tokenizer.json").write_text('{"version": "1.0", "model": 3}')
    before = snapshot(tmp_path)
    result = CliRunner().invoke(main, ["build", "--checkpoint", str(ck), "--out", str(tmp_path / "x")])
    cli_error(result, "tokenizer.json", "not a readable tokenizer")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "name, flags",
    [
        ("model.layers.2.feed_forward.down_proj.weight", []),
        # native dispatch converts and re-lays the experts in one copy (lower_moe_native.relaid): checked there too
        ("model.layers.1.feed_forward.experts.gate_up_proj", ["--moe-dispatch", "native"]),
    ],
)
def test_checkpoint_tensor_with_nan_is_refused(single, tmp_path, name, flags):
    # finding 4: named while it streams into weights.data; this case traces, so it takes seconds
    import torch

    ck = copy_checkpoint(single, tmp_path)
    rewrite_shard(ck / "model.safetensors", lambda t: t[name].view(-1)[5:9].fill_(float("nan")))
    before = snapshot(tmp_path)
    result = CliRunner().invoke(main, ["build", "--checkpoint", str(ck), "--out", str(tmp_path / "x"), *flags])
    cli_error(result, f"checkpoint tensor {name} holds 4 NaN or Inf values")
    assert snapshot(tmp_path) == before
    del torch


def test_concurrent_generate_counts_its_own_steps(engine):
    # finding 7: Generation.steps was wrong when several threads shared one engine
    prompts = {n: [list(range(1, 2 + n))] for n in range(4)}
    alone = {n: engine.generate(p, 6, stop_tokens=[]) for n, p in prompts.items()}
    results: dict[int, object] = {}
    barrier = threading.Barrier(len(prompts))

    def work(n: int) -> None:
        barrier.wait()
        results[n] = engine.generate(prompts[n], 6, stop_tokens=[])

    threads = [threading.Thread(target=work, args=(n,)) for n in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n in prompts:
        assert results[n].tokens == alone[n].tokens
        assert results[n].steps == alone[n].steps == 6  # one prefill step, five decode steps


def test_sigkilled_build_leaves_nothing_after_the_next_build(tmp_path):
    """finding 5: SIGKILL (the OOM killer's signal) mid-build leaves a staging dir; the next build to
    the same --out removes it, and scratch space never lands in $TMPDIR."""
    scratch_tmp = tmp_path / "tmpdir"
    scratch_tmp.mkdir()
    out = tmp_path / "bundles" / "x"
    env = {**os.environ, "TMPDIR": str(scratch_tmp)}
    process = subprocess.Popen(
        [sys.executable, "-m", "llama4_deploy.cli", "build", "--recipe", "tiny", "--out", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not list(out.parent.glob(".x.build/checkpoint-*/model.safetensors")):  # the random checkpoint step
            assert process.poll() is None and time.time() < deadline, "the build ended before it could be killed"
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    leaked = [p.name for p in out.parent.iterdir()]
    assert any(name.startswith(".x.partial-") for name in leaked) and ".x.lock" in leaked, leaked
    # the next build to the same --out (here one whose checkpoint is refused, so it stops early)
    result = CliRunner().invoke(main, ["build", "--checkpoint", str(tmp_path / "nowhere"), "--out", str(out)])
    cli_error(result, "does not exist")
    assert list(out.parent.iterdir()) == []
    assert [p for p in scratch_tmp.rglob("*") if "llama4" in p.name] == []


def test_stale_staging_of_a_live_process_is_kept(tmp_path):
    # only dead owners' staging is removed: a directory named for this (live) process stays,
    # and so does anything not named by the tool
    from llama4_deploy.build.outdir import Staging, _start_token

    out = tmp_path / "x"
    live = tmp_path / f".x.partial-{os.getpid()}-{_start_token(os.getpid())}-abc"
    dead = tmp_path / ".x.partial-999999999-1-abc"
    other = tmp_path / ".x.partial-notes"
    for path in (live, dead, other):
        path.mkdir()
    with Staging(out) as staging:
        assert staging.removed_stale == [dead.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


def test_out_policy_allows_what_it_may_replace(tiny_bundle, tmp_path):
    # the other side of the --out policy: a bundle this tool wrote, an empty dir, anything with force
    from llama4_deploy.build.outdir import OutDirError, Staging, check_out

    shutil.copytree(tiny_bundle, tmp_path / "bundle")
    (tmp_path / "empty").mkdir()
    _keep_dir(tmp_path)
    check_out(tmp_path / "bundle", force=False)
    shutil.copytree(tiny_bundle, tmp_path / "v1")  # a bundle of format 1 (before written_by and files)
    edit_manifest(lambda m: [m.update(format_version=1), m.pop("written_by"), m.pop("files")])(tmp_path / "v1")
    check_out(tmp_path / "v1", force=False)
    shutil.rmtree(tmp_path / "v1")
    check_out(tmp_path / "empty", force=False)
    check_out(tmp_path / "new", force=False)
    check_out(tmp_path / "x", force=True)
    with pytest.raises(OutDirError):
        check_out(tmp_path / "x", force=False)
    # commit swaps the new bundle in only when it is complete, and leaves no staging or lock behind
    with Staging(tmp_path / "bundle") as staging:
        (staging.dir / "manifest.json").write_text("{}")
        staging.commit()
    assert sorted(p.name for p in (tmp_path / "bundle").iterdir()) == ["manifest.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "empty", "x"]


def test_large_files_are_checked_part_by_part(tmp_path):
    # a file above the part size records per-part hashes; the check reads every part (in parallel)
    # and a changed byte in any part, the last short one included, is refused by name
    import hashlib

    from llama4_deploy.runtime import BundleError
    from llama4_deploy.runtime.bundle import Manifest
    from llama4_deploy.runtime.integrity import check_files, file_record

    data = np.random.default_rng(0).bytes(10_000)
    (tmp_path / "weights.data").write_bytes(data)
    record = file_record(tmp_path / "weights.data", part_bytes=4096)
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    assert record["parts"]["sha256"] == [hashlib.sha256(data[i : i + 4096]).hexdigest() for i in (0, 4096, 8192)]
    raw = {"engine": {"graphs": {}, "external_data": "weights.data"}, "files": {"weights.data": record}}
    manifest = Manifest(raw, tmp_path)
    assert check_files(manifest)[:2] == (1, 10_000)
    for at in (10, 5000, 9999):
        changed = bytearray(data)
        changed[at] ^= 1
        (tmp_path / "weights.data").write_bytes(bytes(changed))
        with pytest.raises(BundleError, match=r"^weights\.data in .* has changed since the build"):
            check_files(manifest)


# =================================================================================================
# The catalog, part 2 (issue 26): strictly typed recipes and flags, one validation of model sizes
# (build, plan, cost), checkpoints that disagree with their config, the manifest's limits, commands
# on wrong files. Same contract: exit 2, one `error:` sentence naming the problem, no traceback,
# nothing changed on disk. Every refusal comes before any work (no weights made, nothing traced).
# =================================================================================================


def _tiny_config_json(**changes) -> dict:
    """The tiny recipe's model as transformers writes its config.json, with `changes`."""
    from transformers import Llama4TextConfig

    return {**Llama4TextConfig(**tiny_config()).to_dict(), **changes}


def _config_dir(tmp_path: Path, config: dict) -> Path:
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text(json.dumps(config))
    return ck


def _random_config(**changes) -> Callable[[Path], list[str]]:
    return lambda t: _recipe(t, lambda d: d["random"]["config"].update(changes))


def _recipe_key(dotted: str, value) -> Callable[[Path], list[str]]:
    return lambda t: _recipe(t, set_key(dotted, value))


def _recipe_text(edit: Callable[[str], str]) -> Callable[[Path], list[str]]:
    return lambda t: _recipe(t, None, edit((RECIPE_DIR / "tiny.yaml").read_text()))


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _not_a_file(make: Callable[[Path], object], *args: str, name: str = "p") -> Callable[[Path], list[str]]:
    """`make` turns tmp_path/name into a directory or a FIFO; the args name it with {p}."""

    def prepare(tmp_path: Path) -> list[str]:
        make(tmp_path / name)
        return [a.replace("{p}", str(tmp_path / name)) for a in args]

    return prepare


FP8 = ["--recipe", "tiny", "--precision", "fp8"]

HARDENED_BUILD_CASES = [
    # a random recipe's model sizes, checked as config.json's are, before any weights are made
    BuildCase("recipe-vocab-string", _random_config(vocab_size="512"), ("vocab_size '512' (a string)", "positive")),
    BuildCase("recipe-vocab-float", _random_config(vocab_size=512.5), ("vocab_size 512.5", "positive integer")),
    BuildCase("recipe-hidden-negative", _random_config(hidden_size=-64), ("hidden_size -64", "positive integer")),
    BuildCase("recipe-layers-bool", _random_config(num_hidden_layers=True), ("num_hidden_layers True (a boolean)",)),
    BuildCase("recipe-experts-zero", _random_config(num_local_experts=0), ("num_local_experts 0", "positive")),
    BuildCase(
        "recipe-top-k-above-experts",
        _random_config(num_experts_per_tok=9),
        ("num_experts_per_tok 9, more than its num_local_experts 8",),
    ),
    BuildCase(
        "recipe-heads-not-multiple",
        _random_config(num_attention_heads=3),
        ("num_attention_heads 3, not a multiple of num_key_value_heads 2",),
    ),
    BuildCase("recipe-head-dim-odd", _random_config(head_dim=15), ("head_dim 15, which is odd",)),
    BuildCase(
        "recipe-moe-layer-outside",
        _random_config(moe_layers=[1, 7]),
        ("moe_layers naming layer 7", "num_hidden_layers is 4"),
    ),
    BuildCase("recipe-chunk-zero", _random_config(attention_chunk_size=0), ("attention_chunk_size 0",)),
    BuildCase("recipe-eps-negative", _random_config(rms_norm_eps=-1e-5), ("rms_norm_eps -1e-05", "positive number")),
    BuildCase(
        "recipe-qk-norm-string", _random_config(use_qk_norm="false"), ("use_qk_norm 'false' (a string)", "true or")
    ),
    BuildCase("recipe-eos-outside-vocab", _random_config(eos_token_id=600), ("eos_token_id 600", "[0, 512)")),
    BuildCase("recipe-eos-list-outside", _random_config(eos_token_id=[2, 512]), ("eos_token_id [2, 512]", "512")),
    BuildCase("recipe-bos-bool", _random_config(bos_token_id=True), ("bos_token_id True (a boolean)",)),
    BuildCase("recipe-pad-negative", _random_config(pad_token_id=-1), ("pad_token_id -1", "[0, 512)")),
    BuildCase(
        "recipe-config-other-field",
        _random_config(initializer_range="x"),
        ("not a valid Llama4TextConfig", "initializer_range"),
    ),
    # recipe values: no bool for a number, no string for a number, no float for an integer
    BuildCase("recipe-max-batch-true", _recipe_key("profiles.max_batch", True), ("profiles.max_batch True (bool)",)),
    BuildCase("recipe-max-context-string", _recipe_key("profiles.max_context", "128"), ("max_context '128' (str)",)),
    BuildCase("recipe-seed-bool", _recipe_key("random.seed", True), ("random.seed True (bool)",)),
    BuildCase("recipe-seed-negative", _recipe_key("random.seed", -1), ("random.seed -1", "greater than or equal")),
    BuildCase("recipe-gain-string", _recipe_key("random.logit_gain", "40"), ("random.logit_gain '40' (str)",)),
    BuildCase("recipe-capacity-bool", _recipe_key("capacity_factor", True), ("capacity_factor True (bool)",)),
    BuildCase("recipe-block-size-float", _recipe_key("block_size", 64.0), ("block_size 64.0", "an integer")),
    BuildCase("recipe-stages-float", _recipe_key("stages", 1.0), ("stages 1.0 (float)",)),
    BuildCase(
        "recipe-prompt-length-bool", _recipe_key("verify.prompt_lengths", [19, True]), ("prompt_lengths.1 True",)
    ),
    BuildCase("recipe-new-tokens-string", _recipe_key("verify.new_tokens", "32"), ("new_tokens '32' (str)",)),
    BuildCase("recipe-required-string", _recipe_key("checkpoint_required", "yes"), ("checkpoint_required 'yes'",)),
    BuildCase(
        "recipe-duplicate-key",
        _recipe_text(lambda text: text.replace("  max_batch: 4\n", "  max_batch: 4\n  max_batch: 8\n")),
        ("r.yaml gives key 'max_batch' twice", "lines 40 and 41"),
    ),
    BuildCase(
        "recipe-duplicate-top-key",
        _recipe_text(lambda text: text + "name: other\n"),
        ("gives key 'name' twice", "lines 1 and"),
    ),
    BuildCase("recipe-name-a-path", _recipe_key("name", "../../escaped_out"), ("'../../escaped_out'", "plain name")),
    BuildCase("recipe-name-hidden", _recipe_key("name", ".x"), ("name '.x'", "plain name")),
    BuildCase("recipe-name-empty", _recipe_key("name", ""), ("name ''", "plain name")),
    # paths: empty, or a directory or FIFO where a file is expected (never "does not exist", never a hang)
    BuildCase("recipe-empty", lambda t: ["--recipe", ""], ("--recipe is empty",)),
    BuildCase("out-empty", lambda t: ["--recipe", "tiny", "--out", ""], ("--out is empty",)),
    BuildCase("checkpoint-empty", lambda t: ["--checkpoint", ""], ("--checkpoint is empty",)),
    BuildCase("calibration-empty", lambda t: [*FP8, "--calibration", ""], ("--calibration is empty",)),
    BuildCase(
        "recipe-is-a-directory",
        _not_a_file(Path.mkdir, "--recipe", "{p}", name="p.yaml"),
        ("p.yaml is a directory, not a file",),
    ),
    BuildCase(
        "recipe-is-a-fifo",
        lambda t: ["--recipe", str(_fifo(t / "r.yaml"))],
        ("r.yaml is a FIFO (named pipe), not a file",),
    ),
    BuildCase(
        "checkpoint-is-a-file",
        lambda t: (t.joinpath("f").write_text("x"), ["--checkpoint", str(t / "f")])[1],
        ("checkpoint directory", "is a file, not a directory"),
    ),
    BuildCase(
        "checkpoint-is-a-fifo", _not_a_file(_fifo, "--checkpoint", "{p}"), ("is a FIFO (named pipe), not a directory",)
    ),
    BuildCase(
        "checkpoint-config-is-a-directory",
        lambda t: [*_checkpoint(t, None), (t / "ck" / "config.json").mkdir()][:2],
        ("config.json is a directory, not a file",),
    ),
    BuildCase(
        "calibration-is-a-directory",
        _not_a_file(Path.mkdir, *FP8, "--calibration", "{p}"),
        ("calibration file", "is a directory, not a file"),
    ),
    BuildCase(
        "calibration-is-a-fifo",
        _not_a_file(_fifo, *FP8, "--calibration", "{p}"),
        ("calibration file", "is a FIFO (named pipe), not a file"),
    ),
    BuildCase(
        "calibration-not-utf8",
        lambda t: (t.joinpath("c.txt").write_bytes(b"w1 w2\n\xff w3\n"), [*FP8, "--calibration", str(t / "c.txt")])[1],
        ("calibration file", "not valid UTF-8 text (byte 0xff at offset 6)"),
    ),
    # limits: the KV cache against this machine's memory (--force builds past it), the context against the model's
    BuildCase(
        "max-batch-huge",
        lambda t: ["--recipe", "tiny", "--max-batch", "1000000000"],
        ("max_batch 1000000000 x max_context 128", "KV cache of 36,239.62 GiB (float32)", "this machine's", "--force"),
    ),
    BuildCase(
        "max-context-beyond-the-model",
        lambda t: ["--recipe", "tiny", "--max-context", "2048"],
        ("max context 2048 exceeds", "max_position_embeddings of 1024"),
    ),
    # a checkpoint's config.json: read before any tensor is
    BuildCase(
        "checkpoint-experts-zero",
        lambda t: ["--checkpoint", str(_config_dir(t, _tiny_config_json(num_local_experts=0)))],
        ("config.json has num_local_experts 0", "positive integer"),
    ),
    BuildCase(
        "checkpoint-vocab-string",
        lambda t: ["--checkpoint", str(_config_dir(t, _tiny_config_json(vocab_size="512")))],
        ("config.json has vocab_size '512' (a string)",),
    ),
    BuildCase(
        "checkpoint-eos-outside-vocab",
        lambda t: ["--checkpoint", str(_config_dir(t, _tiny_config_json(eos_token_id=600)))],
        ("config.json has eos_token_id 600", "[0, 512)"),
    ),
    BuildCase(
        "checkpoint-image-token-outside-vocab",
        lambda t: [
            "--checkpoint",
            str(_config_dir(t, {"model_type": "llama4", "text_config": _tiny_config_json(), "image_token_index": 600})),
        ],
        ("config.json has image_token_index 600", "[0, 512)"),
    ),
    BuildCase(
        "checkpoint-rope-factor-missing",
        lambda t: [
            "--checkpoint",
            str(_config_dir(t, _tiny_config_json(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0}))),
        ],
        ("rope_parameters lacks 'factor'", "llama3"),
    ),
]


@pytest.mark.parametrize("case", HARDENED_BUILD_CASES, ids=[c.id for c in HARDENED_BUILD_CASES])
def test_catalog_build_inputs(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default --out (build/<name>) would land here, and be seen
    args = case.prepare(tmp_path)
    if "--out" not in args:
        args = [*args, "--out", str(tmp_path / "x")]
    before = snapshot(tmp_path)
    result = CliRunner().invoke(main, ["build", *args])
    cli_error(result, *case.words)
    assert snapshot(tmp_path) == before, "the build changed or left files on disk"


def test_recipe_named_as_a_path_writes_nothing_outside(tmp_path, monkeypatch):
    # the case: without --out, `name: ../../escaped_out` wrote build/../../escaped_out
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    args = _recipe(work, set_key("name", "../../escaped_out"))
    before = snapshot(tmp_path)
    cli_error(CliRunner().invoke(main, ["build", *args]), "'../../escaped_out'", "not a plain name")
    assert snapshot(tmp_path) == before


def test_huge_kv_cache_builds_with_force():
    # past the bound, --force builds: the check reads the machine, the override is the user's
    from llama4_deploy.build.recipe import load_recipe
    from llama4_deploy.build.steps.load import check_limits, machine_memory

    recipe = load_recipe("tiny")
    huge = recipe.model_copy(update={"profiles": recipe.profiles.model_copy(update={"max_batch": 10**9})})
    with pytest.raises(BuildError, match=rf"this machine's {machine_memory() / 2**30:,.1f} GiB of memory"):
        check_limits(huge, recipe.random.shape(), "float32", force=False)
    check_limits(huge, recipe.random.shape(), "float32", force=True)
    check_limits(recipe, recipe.random.shape(), "float32", force=False)


def _edit_config(ck: Path, **changes) -> None:
    config = json.loads((ck / "config.json").read_text())
    config.update(changes)
    (ck / "config.json").write_text(json.dumps(config))


ROUTER = "model.layers.{}.feed_forward.router.weight"


def _retyped(name: str, dtype: str) -> Callable[[Path], None]:
    def edit(tensors: dict) -> None:
        import torch

        tensors[name] = tensors[name].to(getattr(torch, dtype))

    return lambda ck: rewrite_shard(ck / "model.safetensors", edit)


def _added(name: str, like: str) -> Callable[[Path], None]:
    return lambda ck: rewrite_shard(ck / "model.safetensors", lambda t: t.update({name: t[like].clone()}))


# -- the checkpoint agrees with its config: every implied tensor, floating dtypes, nothing left over -----------
@pytest.mark.parametrize(
    "edit, words",
    [
        # the case: the config counts 2 of the checkpoint's 4 layers
        (
            lambda ck: _edit_config(ck, num_hidden_layers=2, moe_layers=[1], no_rope_layers=[1, 1]),
            ("the checkpoint holds layer 2 (model.layers.2.", "and 20 more tensors", "num_hidden_layers is 2"),
        ),
        # the same, with the config's own layer lists left at 4 layers: refused naming the list
        (lambda ck: _edit_config(ck, num_hidden_layers=2), ("moe_layers naming layer 3", "num_hidden_layers is 2")),
        (_retyped(Q_PROJ, "int32"), (f"tensor {Q_PROJ} is stored as I32", "floating-point")),
        (_retyped(Q_PROJ, "float8_e4m3fn"), (f"tensor {Q_PROJ} is stored as F8_E4M3", "compressed-tensors")),
        (
            _added(ROUTER.format(0), like=ROUTER.format(1)),  # a router in dense layer 0
            (f"holds tensor {ROUTER.format(0)}", "would ignore it"),
        ),
        (
            lambda ck: _edit_config(ck, tie_word_embeddings=True),
            ("holds lm_head.weight", "tie_word_embeddings true"),
        ),
        (lambda ck: _edit_config(ck, eos_token_id=[2, 600]), ("config.json has eos_token_id [2, 600]", "600")),
        (lambda ck: _edit_config(ck, bos_token_id=512), ("config.json has bos_token_id 512", "[0, 512)")),
    ],
    ids=["layers-not-counted", "layer-list-beyond", "int32", "raw-fp8", "extra-tensor", "tied-head", "eos", "bos"],
)
def test_checkpoint_disagrees_with_config(single, tmp_path, edit, words):
    ck = copy_checkpoint(single, tmp_path)
    edit(ck)
    before = snapshot(tmp_path)
    result = CliRunner().invoke(main, ["build", "--checkpoint", str(ck), "--out", str(tmp_path / "x")])
    cli_error(result, *words)
    assert snapshot(tmp_path) == before


def test_multimodal_image_tokens_in_vocab(checkpoint_dir, tmp_path):
    # the session's multimodal checkpoint builds (its image tokens are the text vocabulary's last ids); one moved
    # outside is refused before any tensor is read, its vision tensors never counted as the text model's
    ck = copy_checkpoint(checkpoint_dir, tmp_path)
    _edit_config(ck, eoi_token_index=512)
    before = snapshot(tmp_path)
    result = CliRunner().invoke(main, ["build", "--checkpoint", str(ck), "--out", str(tmp_path / "x")])
    cli_error(result, "config.json has eoi_token_index 512", "[0, 512)")
    assert snapshot(tmp_path) == before


# -- the manifest's limits at load, the sizes `cost` divides by, commands on wrong files, serve's flags ----------
def _write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda bundle: (bundle / name).write_bytes(data)


def _text_beside(data: bytes) -> Callable[[Path], None]:
    return lambda bundle: (bundle.parent / "t.txt").write_bytes(data)


def _plan_checkpoint(**changes) -> Callable[[Path], None]:
    return lambda bundle: _config_dir(bundle.parent, _tiny_config_json(**changes))


SERVE = ["serve", "{b}"]
EVAL = ["eval", "{b}", "--text"]

HARDENED_BUNDLE_CASES = [
    BundleCase(
        "eos-outside-vocab",
        edit_manifest(set_key("model.eos_token_ids", [2, 600])),
        RUN,
        ("model.eos_token_ids holds 600", "[0, 512)"),
    ),
    BundleCase("bos-outside-vocab", edit_manifest(set_key("model.bos_token_id", 512)), RUN, ("model.bos_token_id",)),
    BundleCase(
        "context-beyond-the-model",
        edit_manifest(set_key("profiles.max_context", 2048)),
        RUN,
        ("profiles.max_context 2048 exceeds", "max_position_embeddings of 1024"),
    ),
    BundleCase(
        "max-positions-not-int",
        edit_manifest(set_key("model.max_position_embeddings", "1024")),
        RUN_UNCHECKED,
        ("model.max_position_embeddings must be a positive integer",),
    ),
    BundleCase(
        "manifest-is-a-fifo",
        lambda b: [(b / "manifest.json").unlink(), os.mkfifo(b / "manifest.json")],
        RUN,
        ("manifest.json is a FIFO (named pipe), not a file",),
    ),
    BundleCase(
        "cost-experts-zero",
        edit_manifest(set_key("model.num_experts", 0)),
        COST,
        ("model.num_experts 0", "positive integer"),
    ),
    BundleCase(
        "cost-top-k-above-experts",
        edit_manifest(set_key("model.top_k", 9)),
        COST,
        ("model.top_k 9, more than its model.num_experts 8",),
    ),
    BundleCase(
        "cost-hidden-negative", edit_manifest(set_key("model.hidden_size", -64)), COST, ("model.hidden_size -64",)
    ),
    BundleCase("cost-heads-string", edit_manifest(set_key("model.num_heads", "4")), COST, ("model.num_heads '4'",)),
    # lint on something that is not an ONNX model
    BundleCase("lint-empty-file", _write("e.onnx", b""), ["lint", "{b}/e.onnx"], ("e.onnx is empty (0 bytes)",)),
    BundleCase("lint-empty-in-bundle", _write("e.onnx", b""), LINT, ("e.onnx is empty (0 bytes)",)),
    BundleCase(
        "lint-text-file", _write("t.onnx", b"hello\n"), ["lint", "{b}/t.onnx"], ("t.onnx cannot be read as ONNX",)
    ),
    BundleCase(
        "lint-stray-bytes",
        _write("s.onnx", b"\x08\x07"),
        ["lint", "{b}/s.onnx"],
        ("s.onnx is not an ONNX model", "no IR version, opset or graph output"),
    ),
    BundleCase(
        "lint-fifo",
        lambda b: os.mkfifo(b / "f.onnx"),
        ["lint", "{b}/f.onnx"],
        ("f.onnx is a FIFO (named pipe), neither an ONNX file nor a bundle directory",),
    ),
    BundleCase("lint-empty-path", None, ["lint", ""], ("path to lint is empty",)),
    # eval --text: UTF-8 or refused (--errors replace says how much it replaced); a file, not a directory or FIFO
    BundleCase(
        "eval-text-not-utf8",
        _text_beside(b"w1 w2 \xff\xfe w3"),
        [*EVAL, "{b}/../t.txt"],
        ("t.txt is not valid UTF-8 text (byte 0xff at offset 6)", "--errors replace"),
    ),
    BundleCase(
        "eval-text-random-bytes",
        _text_beside(bytes(range(128, 256)) * 64),
        [*EVAL, "{b}/../t.txt"],
        ("not valid UTF-8 text (byte 0x80 at offset 0)",),
    ),
    BundleCase("eval-text-directory", None, [*EVAL, "{b}"], ("text file", "is a directory, not a file")),
    BundleCase(
        "eval-text-fifo",
        lambda b: os.mkfifo(b.parent / "t.txt"),
        [*EVAL, "{b}/../t.txt"],
        ("t.txt is a FIFO (named pipe), not a file",),
    ),
    BundleCase("eval-text-empty", None, [*EVAL, ""], ("text file is an empty path",)),
    # the same bytes the server answers 400 to, through run --prompt (argv bytes that are not UTF-8)
    BundleCase(
        "run-prompt-lone-surrogate",
        None,
        ["run", "{b}", "--prompt", "w1 \ud800 w2"],
        ("--prompt is not valid Unicode text", "character 3", "lone surrogate"),
    ),
    # serve's flags, refused before the bundle is opened
    BundleCase("serve-port-above", None, [*SERVE, "--port", "99999"], ("--port is 99999", "[0, 65535]")),
    BundleCase("serve-port-negative", None, [*SERVE, "--port", "-1"], ("--port is -1",)),
    BundleCase("serve-drain-nan", None, [*SERVE, "--drain-timeout", "nan"], ("--drain-timeout is nan", "finite")),
    BundleCase("serve-drain-inf", None, [*SERVE, "--drain-timeout", "inf"], ("--drain-timeout is inf",)),
    BundleCase("serve-drain-negative", None, [*SERVE, "--drain-timeout", "-1"], ("--drain-timeout is -1.0",)),
    BundleCase("serve-queue-negative", None, [*SERVE, "--max-queue", "-1"], ("--max-queue is -1", "at least 0")),
    BundleCase("serve-admission-wait", None, [*SERVE, "--admission-wait-ms", "2000"], ("--admission-wait-ms is 2000",)),
    BundleCase("serve-batch-zero", None, [*SERVE, "--max-batch", "0"], ("--max-batch is 0", "at least 1")),
    BundleCase("serve-threads-zero", None, [*SERVE, "--threads", "0"], ("--threads is 0",)),
    BundleCase(
        "serve-max-request-bytes-zero", None, [*SERVE, "--max-request-bytes", "0"], ("--max-request-bytes is 0",)
    ),
    BundleCase(
        "serve-media-path-missing",
        None,
        [*SERVE, "--allowed-local-media-path", "{b}/no-such-dir"],
        ("--allowed-local-media-path", "no-such-dir", "is not a directory"),
    ),
    # plan: the same validation of the sizes as the build's
    BundleCase(
        "plan-experts-zero",
        _plan_checkpoint(num_local_experts=0),
        ["plan", "{b}/../ck"],
        ("config.json has num_local_experts 0", "positive integer"),
    ),
    BundleCase("plan-hidden-negative", _plan_checkpoint(hidden_size=-64), ["plan", "{b}/../ck"], ("hidden_size -64",)),
    BundleCase(
        "plan-top-k-above-experts",
        _plan_checkpoint(num_experts_per_tok=9),
        ["plan", "{b}/../ck"],
        ("num_experts_per_tok 9, more than its num_local_experts 8",),
    ),
    BundleCase(
        "plan-recipe-experts-zero",
        lambda b: _recipe(b.parent, lambda d: d["random"]["config"].update(num_local_experts=0)),
        ["plan", "{b}/../r.yaml"],
        ("random.config has num_local_experts 0",),
    ),
    BundleCase("plan-context-zero", None, ["plan", "tiny", "--context", "0"], ("--context 0",)),
]


@pytest.mark.parametrize("case", HARDENED_BUNDLE_CASES, ids=[c.id for c in HARDENED_BUNDLE_CASES])
def test_catalog_commands(case, tiny_bundle, tmp_path):
    test_catalog_bundle(case, tiny_bundle, tmp_path)


def test_eval_replaces_undecodable_bytes_when_asked(checkpoint_bundle, tmp_path):
    # --errors replace: the text is read with each undecodable byte as U+FFFD, and the summary says how many
    words = " ".join(f"w{i % 500}" for i in range(1100)).encode()
    (tmp_path / "t.txt").write_bytes(words[:100] + b" \xff \xfe\xfd " + words[100:])
    text = str(tmp_path / "t.txt")
    cli_error(CliRunner().invoke(main, ["eval", str(checkpoint_bundle), "--text", text]), "not valid UTF-8")
    result = CliRunner().invoke(main, ["eval", str(checkpoint_bundle), "--text", text, "--errors", "replace"])
    assert result.exit_code == 0, result.output
    assert "; 3 undecodable bytes of the text read as U+FFFD" in result.stdout
    assert re.match(r"perplexity \d+\.\d+ on t\.txt \(1023 predicted tokens, 1 windows of 1024\)", result.stdout)


# =================================================================================================
# The catalog, part 3 (issue 26): requests the server must refuse. Each case asserts the HTTP status, OpenAI's
# error object (message, type, param, code) whose message is one line naming the field, and afterwards the
# server still answers: a greedy completion equal to `generate`. One server for the module.
# =================================================================================================
@dataclasses.dataclass(frozen=True)
class ServerCase:
    id: str
    body: dict | bytes  # dict: completed with the served model's name (unless it sets "model")
    status: int
    param: str | None  # the error object's param
    words: tuple[str, ...]  # what the message must say
    path: str = "/v1/completions"


CHAT = "/v1/chat/completions"


def _chat(content, **extra) -> dict:
    return {"messages": [{"role": "user", "content": content}], **extra}


SERVER_CASES = [
    # no string or bool where a number or token id is meant (the server used to coerce them)
    ServerCase("http-max-tokens-string", {"prompt": "w1", "max_tokens": "8"}, 400, "max_tokens", ("valid integer",)),
    ServerCase("http-max-tokens-bool", {"prompt": "w1", "max_tokens": True}, 400, "max_tokens", ("valid integer",)),
    ServerCase("http-max-tokens-float", {"prompt": "w1", "max_tokens": 8.5}, 400, "max_tokens", ("valid integer",)),
    ServerCase("http-prompt-bools", {"prompt": [True, False]}, 400, "prompt", ("item 0 is true, a boolean",)),
    ServerCase("http-prompt-float-ids", {"prompt": [1.5, 2]}, 400, "prompt", ("item 0 is 1.5",)),
    ServerCase("http-prompt-nested-bool", {"prompt": [[1, True]]}, 400, "prompt", ("item 0, entry 1 is True",)),
    ServerCase("http-prompt-number", {"prompt": 17}, 400, "prompt", ("must be a string, a list of token ids",)),
    ServerCase("http-prompt-negative-id", {"prompt": [1, -2]}, 400, "prompt.1", ("greater than or equal to 0",)),
    ServerCase(
        "http-temperature-string", {"prompt": "w1", "temperature": "0.7"}, 400, "temperature", ("valid number",)
    ),
    ServerCase("http-temperature-bool", {"prompt": "w1", "temperature": True}, 400, "temperature", ("valid number",)),
    ServerCase("http-top-p-string", {"prompt": "w1", "top_p": "1"}, 400, "top_p", ("valid number",)),
    ServerCase("http-logprobs-bool", {"prompt": "w1", "logprobs": True}, 400, "logprobs", ("valid integer",)),
    ServerCase("http-n-string", {"prompt": "w1", "n": "1"}, 400, "n", ("valid integer",)),
    ServerCase("http-stream-string", {"prompt": "w1", "stream": "true"}, 400, "stream", ("valid boolean",)),
    ServerCase("http-ignore-eos-number", {"prompt": "w1", "ignore_eos": 1}, 400, "ignore_eos", ("valid boolean",)),
    ServerCase(
        "http-include-usage-string",
        {"prompt": "w1", "stream": True, "stream_options": {"include_usage": "yes"}},
        400,
        "stream_options.include_usage",
        ("valid boolean",),
    ),
    ServerCase("http-stop-bool", {"prompt": "w1", "stop": [True]}, 400, "stop.0", ("valid",)),
    ServerCase(
        "http-stop-token-ids-strings",
        {"prompt": "w1", "stop_token_ids": ["5"]},
        400,
        "stop_token_ids.0",
        ("valid integer",),
    ),
    ServerCase(
        "http-top-logprobs-string", {**_chat("w1"), "top_logprobs": "2"}, 400, "top_logprobs", ("valid integer",), CHAT
    ),
    ServerCase(
        "http-chat-max-tokens-bool", {**_chat("w1"), "max_tokens": True}, 400, "max_tokens", ("valid integer",), CHAT
    ),
    # finite numbers: NaN and infinities say so (NaN used to get "less than or equal to 2")
    ServerCase(
        "http-temperature-nan", b'{"model": "M", "prompt": "w1", "temperature": NaN}', 400, "temperature", ("finite",)
    ),
    ServerCase(
        "http-temperature-inf",
        b'{"model": "M", "prompt": "w1", "temperature": Infinity}',
        400,
        "temperature",
        ("finite",),
    ),
    ServerCase("http-top-p-nan", b'{"model": "M", "prompt": "w1", "top_p": NaN}', 400, "top_p", ("finite",)),
    ServerCase(
        "http-chat-temperature-nan",
        b'{"model": "M", "messages": [{"role": "user", "content": "w1"}], "temperature": -Infinity}',
        400,
        "temperature",
        ("finite",),
        CHAT,
    ),
    # seeds in [0, 2^64): -1 used to kill the scheduler thread
    ServerCase(
        "http-seed-negative",
        {"prompt": "w1", "seed": -1, "temperature": 0.7},
        400,
        "seed",
        ("greater than or equal to 0",),
    ),
    ServerCase(
        "http-seed-2-64",
        {"prompt": "w1", "seed": 2**64, "temperature": 0.7},
        400,
        "seed",
        ("less than 18446744073709551616",),
    ),
    ServerCase("http-seed-float", {"prompt": "w1", "seed": 1.5}, 400, "seed", ("valid integer",)),
    ServerCase("http-seed-string", {"prompt": "w1", "seed": "7"}, 400, "seed", ("valid integer",)),
    ServerCase(
        "http-chat-seed-negative", {**_chat("w1"), "seed": -1}, 400, "seed", ("greater than or equal to 0",), CHAT
    ),
    # text is Unicode scalar values: a lone surrogate (JSON's \ud800 escape) used to be a bare 500
    ServerCase(
        "http-prompt-lone-surrogate",
        {"prompt": "a \ud800 b"},
        400,
        "prompt",
        ("lone surrogate (U+D800)", "character 2"),
    ),
    ServerCase(
        "http-prompt-list-lone-surrogate", {"prompt": ["w1 \udfff"]}, 400, "prompt.0", ("lone surrogate (U+DFFF)",)
    ),
    ServerCase(
        "http-stop-lone-surrogate", {"prompt": "w1", "stop": "\ud83d"}, 400, "stop", ("lone surrogate (U+D83D)",)
    ),
    ServerCase("http-chat-lone-surrogate", _chat("a \ud800 b"), 400, "messages.0.content", ("lone surrogate",), CHAT),
    ServerCase(
        "http-chat-part-lone-surrogate",
        _chat([{"type": "text", "text": "\udc00"}]),
        400,
        "messages.0.content.0.text",
        ("lone surrogate (U+DC00)",),
        CHAT,
    ),
    ServerCase("http-model-lone-surrogate", {"model": "\ud800", "prompt": "w1"}, 400, "model", ("lone surrogate",)),
    # the body itself
    ServerCase(
        "http-body-over-the-limit",
        {"prompt": "w1 " * 400_000},
        413,
        None,
        ("exceeds the server's limit of 1048576 bytes",),
    ),
    ServerCase(
        "http-prompt-far-beyond-context",
        {"prompt": "w5 " * 5000},
        400,
        "prompt",
        ("5000 tokens", "exceeds the bundle's context"),
    ),
]


@pytest.fixture(scope="module")
def catalog_server(checkpoint_bundle):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from tests.test_serve import Live

    with load(checkpoint_bundle) as engine, Live(engine, max_request_bytes=2**20) as live:
        yield live, engine


@pytest.mark.parametrize("case", SERVER_CASES, ids=[c.id for c in SERVER_CASES])
def test_catalog_server(case, catalog_server):
    live, engine = catalog_server
    name = engine.manifest.name
    body = case.body.replace(b'"M"', json.dumps(name).encode()) if isinstance(case.body, bytes) else case.body
    if isinstance(body, dict):
        body = json.dumps({"model": name, **body}).encode()  # json escapes a lone surrogate as \ud800
    status, _, answer = live.post(case.path, body)
    assert status == case.status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == case.param, error
    single_sentence(error["message"])
    for word in (*case.words, *([case.param] if case.param else [])):
        assert word in error["message"], (word, error["message"])
    # the server still answers, with what generate gives
    expected = engine.generate([[5, 6, 7]], 3, stop_tokens=[]).tokens[0]
    ok = {"model": name, "prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    status, _, answer = live.post("/v1/completions", ok)
    assert status == 200 and answer["choices"][0]["token_ids"] == expected, answer
