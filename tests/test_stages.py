"""Pipeline stages: a maverick-mini split into 2 and 3 stage graphs computes what the unsplit build
computes, for every MoE dispatch, on the prefill and the decode path, and greedy tokens agree.

One bundle per stage count holds every dispatch (capacity, its exact graph native, and dense and
gather saved beside them), so three builds cover twelve engines; each engine is pointed at one
dispatch by replacing its roles' graph records.

Tolerance: max |dlogit| <= 1e-5 x max(1, max |logit|). Both sides are the same fp32 graphs, cut at a
layer boundary; ONNX Runtime may fuse the residual Add of the last layer of a stage into the next
layer's RMS norm (SkipSimplifiedLayerNormalization) only inside one graph, which changes the
rounding of that sum by an ulp (about 1e-7 relative) and moves logits by a few 1e-6 at logits of
~30. A wrong cut (a layer run twice or skipped, a cache fed to the wrong stage, a stage's mask
built for the wrong layer kind) moves them by whole units.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from llama4_deploy.build.stages import split_layers
from llama4_deploy.runtime import abi
from tests.conftest import opened_engines, quiet_build, recipe_checkpoint

REL_TOLERANCE = 1e-5
DISPATCHES = ("dense", "gather", "capacity", "native")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """maverick-mini with 1, 2 and 3 stages, every dispatch in each, from one written checkpoint."""
    root = tmp_path_factory.mktemp("stages")
    ckpt = recipe_checkpoint("maverick-mini", root / "ckpt")
    every = dict(checkpoint=ckpt, moe_dispatch="capacity", extra_dispatches=("dense", "gather"))
    return {n: quiet_build("maverick-mini", root / f"s{n}", stages=n, **every) for n in (1, 2, 3)}


@pytest.fixture(scope="module")
def engines(bundles):
    yield from opened_engines(bundles)


def _use(engine, dispatch: str) -> None:
    """Point the engine's prefill and decode roles, in every stage, at one dispatch's graphs (capacity
    is the built prefill/decode role, native its exact graph, dense and gather the extra roles)."""
    built = engine.__dict__.setdefault("built_stages", engine.stages)
    role = next(r for r, graph in engine.graphs.items() if graph["moe_dispatch"] == dispatch)
    engine.stages = [
        dataclasses.replace(stage, graphs={**stage.graphs, "prefill": stage.graphs[role], "decode": stage.graphs[role]})
        for stage in built
    ]


def test_manifest_records_the_split(bundles):
    from tests.conftest import manifest

    assert "stages" not in manifest(bundles[1])["engine"]  # the unsplit layout is unchanged
    for n, layers in ((2, [[0, 2], [2, 4]]), (3, [[0, 1], [1, 3], [3, 4]])):
        stages = manifest(bundles[n])["engine"]["stages"]
        assert [s["layers"] for s in stages] == layers
        assert stages[0]["inputs"][0] == abi.INPUT_IDS and stages[-1]["outputs"][0] == abi.LOGITS
        assert all(s["inputs"][0] == abi.HIDDEN_IN for s in stages[1:])
        assert all(s["outputs"][0] == abi.HIDDEN_OUT for s in stages[:-1])
        for index, stage in enumerate(stages):
            assert stage["external_data"] == f"stage{index}.weights.data"
            assert stage["graphs"]["gather"]["file"] == f"stage{index}.gather.onnx"
            # maverick-mini's MoE layers are 1 and 3: a stage without one reports no overflow
            has_moe = any(layer % 2 == 1 for layer in range(*stage["layers"]))
            assert stage["graphs"]["prefill"]["reports_overflow"] == has_moe
            assert stage["inputs"][3:] == abi.past_names(range(*stage["layers"]))


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_stages_compute_what_one_stage_computes(engines, dispatch):
    ids = [int(i) for i in np.random.default_rng(3).integers(0, engines[1].vocab_size, size=24)]
    for engine in engines.values():
        _use(engine, dispatch)
    reference = {mode: engines[1].score(ids, mode=mode) for mode in ("prefill", "decode")}
    greedy = engines[1].generate([ids[:5], ids[:13]], max_new_tokens=8).tokens
    for n in (2, 3):
        engine = engines[n]
        reruns = engine.overflow_reruns
        for mode, want in reference.items():
            got = engine.score(ids, mode=mode)
            tolerance = REL_TOLERANCE * max(1.0, float(np.abs(want).max()))
            worst = float(np.abs(got - want).max())
            assert worst <= tolerance, f"{n} stages, {dispatch}, {mode}: max |dlogit| {worst:.3e} > {tolerance:.3e}"
        if dispatch == "capacity":  # 24 tokens over 128 experts overflow one slot each: rerun on native
            assert engine.overflow_reruns > reruns
        assert engine.generate([ids[:5], ids[:13]], max_new_tokens=8).tokens == greedy


def test_split_balances_bytes_and_refuses_bad_counts():
    assert [(s.start, s.stop) for s in split_layers([1, 10, 1, 10], 2)] == [(0, 2), (2, 4)]
    assert [(s.start, s.stop) for s in split_layers([5, 5, 5, 5], 3, first_bytes=6)] == [(0, 1), (1, 2), (2, 4)]
    assert [(s.start, s.stop) for s in split_layers([1] * 4, 4)] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(ValueError, match="5 stages exceed the model's 4 layers"):
        split_layers([1] * 4, 5)
    with pytest.raises(ValueError, match="at least 1"):
        split_layers([1] * 4, 0)


@pytest.mark.parametrize(
    "stages, words",
    [("0", "--stages 0: input should be greater than or equal to 1"), ("5", "--stages 5 exceeds the model's 4 layers")],
)
def test_bad_stage_counts_are_one_sentence(stages, words, checkpoint_dir, tmp_path):
    from click.testing import CliRunner

    from llama4_deploy.cli import main
    from tests.test_bad_input import cli_error

    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["build", "--checkpoint", str(checkpoint_dir), "--out", str(out), "--stages", stages]
    )
    assert words in cli_error(result)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_damaged_stage_records_are_refused(bundles, tmp_path):
    """A manifest whose stages leave a layer out, or a stage graph swapped for another stage's, is
    refused in one sentence (the second by its weight-layout fingerprint, with the hashes skipped)."""
    import shutil

    from llama4_deploy.runtime import BundleError, load
    from tests.test_bad_input import edit_manifest

    gap = shutil.copytree(bundles[2], tmp_path / "gap")
    edit_manifest(lambda m: m["engine"]["stages"][1].update(layers=[3, 4]))(gap)
    with pytest.raises(BundleError, match=r"engine\.stages\[1\]\.layers must be \[2, stop\]"):
        load(gap, verify_files=False)
    swapped = shutil.copytree(bundles[2], tmp_path / "swapped")
    shutil.copyfile(swapped / "stage0.gather.onnx", swapped / "stage1.gather.onnx")
    with pytest.raises(BundleError, match=r"^stage1\.gather\.onnx in .* expects a different stage1\.weights\.data"):
        load(swapped, verify_files=False)
