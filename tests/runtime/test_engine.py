"""The runtime on the tiny bundle: batching, stopping, sampling, scoring, golden outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llama4_deploy.runtime import load
from llama4_deploy.runtime.engine import prefill_chunk

REPO = Path(__file__).resolve().parents[2]
BUILD_ONLY = ("torch", "transformers", "onnx_ir")
# Engine vs engine on the same bundle: only the padding/batch shape differs, which changes
# nothing but summation order, far below this (and far below the tiny model's logit gaps).
ATOL = 1e-4


def prompts_of(lengths, seed=0, vocab=512):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, vocab, size=n)] for n in lengths]


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    with load(tiny_bundle) as engine:
        yield engine


# -- (a) the runtime imports no build dependencies ----------------------------------------------
def _run_python(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_runtime_import_pulls_no_build_dependencies():
    code = (
        "import json, sys\n"
        "import llama4_deploy.runtime\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {BUILD_ONLY!r})\n"
        "print(json.dumps({'heavy': heavy, 'engine': 'llama4_deploy.runtime.engine' in sys.modules}))\n"
    )
    found = _run_python(code)
    assert found["engine"]  # the runtime really was imported
    assert found["heavy"] == []


def test_runtime_generates_with_build_dependencies_blocked(engine, tiny_bundle):
    # stronger than the sys.modules check: loading and generating never even try to import them
    code = (
        "import json, sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {BUILD_ONLY!r}:\n"
        "            raise ImportError('runtime imported ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from llama4_deploy.runtime import load\n"
        f"with load({str(tiny_bundle)!r}) as engine:\n"
        "    out = engine.generate([[1, 2, 3]], 6, stop_tokens=[])\n"
        "print(json.dumps(out.tokens))\n"
    )
    assert _run_python(code) == engine.generate([[1, 2, 3]], 6, stop_tokens=[]).tokens


# -- (b) ragged batch == each prompt alone ------------------------------------------------------
def test_prefill_chunk_packs_each_rows_next_tokens_and_pads_the_rest():
    # rows: mid-prompt, shorter than the chunk, not prefilling (empty), done
    ids, positions, take = prefill_chunk([[5, 6, 7, 8, 9], [1, 2], (), [3, 4, 5, 6]], [1, 0, 0, 4], chunk_tokens=3)
    assert take == [3, 2, 0, 0]
    assert ids.dtype == positions.dtype == np.int64
    assert ids.tolist() == [[6, 7, 8], [1, 2, 0], [0, 0, 0], [0, 0, 0]]
    assert positions.tolist() == [[1, 2, 3], [0, 1, -1], [-1, -1, -1], [-1, -1, -1]]
    # a row's last chunk is its rest, and a step is as wide as its widest row
    ids, positions, take = prefill_chunk([[5, 6, 7, 8, 9]], [4], chunk_tokens=3)
    assert (ids.tolist(), positions.tolist(), take) == ([[9]], [[4]], [1])


def test_ragged_batch_equals_each_prompt_alone(engine):
    # lengths cross the prefill step (16) and the attention chunk (8) differently per row, so
    # rows are padded (position -1) in both prefill and decode steps. Padding must not
    # influence valid rows: same tokens, and logits equal up to summation order.
    prompts = prompts_of([19, 3, 34, 8], seed=1)
    assert len(prompts) <= engine.max_batch
    batched = engine.generate(prompts, 12, stop_tokens=[], return_logits=True)
    assert [len(t) for t in batched.tokens] == [12] * 4
    for prompt, tokens, logits in zip(prompts, batched.tokens, batched.logits):
        alone = engine.generate([prompt], 12, stop_tokens=[], return_logits=True)
        assert tokens == alone.tokens[0]
        np.testing.assert_allclose(logits, alone.logits[0], rtol=0, atol=ATOL)


def test_ragged_batch_with_a_row_stopping_early(engine):
    # a row that stops becomes padding for the remaining decode steps; the others must not notice
    prompts = prompts_of([11, 6, 21], seed=2)
    free = engine.generate(prompts, 10, stop_tokens=[])
    stop = free.tokens[0][2]
    assert stop not in free.tokens[1] and stop not in free.tokens[2], "pick prompts where only row 0 stops"
    stopped = engine.generate(prompts, 10, stop_tokens=[stop])
    assert stopped.tokens[0] == free.tokens[0][: free.tokens[0].index(stop) + 1]
    assert stopped.tokens[1:] == free.tokens[1:]


# -- (c) more prompts than the profile's batch --------------------------------------------------
def test_more_prompts_than_max_batch(engine):
    assert engine.max_batch == 4
    prompts = prompts_of([5, 17, 2, 9, 30, 12], seed=3)
    together = engine.generate(prompts, 7, stop_tokens=[], return_logits=True)
    assert len(together.tokens) == len(together.logits) == 6
    for prompt, tokens, logits in zip(prompts, together.tokens, together.logits):
        alone = engine.generate([prompt], 7, stop_tokens=[], return_logits=True)
        assert tokens == alone.tokens[0]
        np.testing.assert_allclose(logits, alone.logits[0], rtol=0, atol=ATOL)


# -- (d) stop tokens ----------------------------------------------------------------------------
def test_stop_token_ends_generation_inclusively(engine):
    prompt = prompts_of([13], seed=4)[0]
    free = engine.generate([prompt], 20, stop_tokens=[]).tokens[0]
    assert len(free) == 20
    stop = free[2]
    first = free.index(stop)  # the 3rd token may repeat an earlier one
    stopped = engine.generate([prompt], 20, stop_tokens=[stop])
    assert stopped.tokens[0] == free[: first + 1]
    assert stopped.tokens[0][-1] == stop
    assert stopped.steps < engine.generate([prompt], 20, stop_tokens=[]).steps  # it really stopped early


def test_stop_tokens_none_means_the_manifest_eos(engine):
    eos = engine.manifest.eos_token_ids
    assert eos == [2]  # tiny's Llama4TextConfig default
    prompts = prompts_of([3, 5, 7, 9, 11, 13, 15, 17], seed=0)
    free = engine.generate(prompts, 40, stop_tokens=[]).tokens
    default = engine.generate(prompts, 40).tokens
    assert default == engine.generate(prompts, 40, stop_tokens=eos).tokens
    hit = [i for i, tokens in enumerate(free) if any(t in eos for t in tokens)]
    assert hit, "no prompt reaches eos; the test would prove nothing"
    for tokens, full in zip(default, free):
        ends = [i for i, t in enumerate(full) if t in eos]
        assert tokens == (full[: ends[0] + 1] if ends else full)


# -- (e) sampling -------------------------------------------------------------------------------
def test_sampling_is_reproducible_with_a_seed(engine):
    prompts = prompts_of([6, 10], seed=5)
    a = engine.generate(prompts, 12, temperature=1.0, seed=123, stop_tokens=[])
    b = engine.generate(prompts, 12, temperature=1.0, seed=123, stop_tokens=[])
    assert a.tokens == b.tokens


def test_sampling_differs_across_seeds(engine):
    prompts = prompts_of([6, 10], seed=5)
    first = engine.generate(prompts, 12, temperature=1.0, seed=0, stop_tokens=[]).tokens
    others = [engine.generate(prompts, 12, temperature=1.0, seed=s, stop_tokens=[]).tokens for s in (1, 2, 3, 4)]
    assert any(o != first for o in others)
    greedy = engine.generate(prompts, 12, stop_tokens=[]).tokens
    assert any(o != greedy for o in [first, *others])  # sampling really samples


def test_tiny_top_p_is_greedy(engine):
    prompts = prompts_of([6, 10], seed=5)
    greedy = engine.generate(prompts, 12, stop_tokens=[]).tokens
    hot = [engine.generate(prompts, 12, temperature=5.0, seed=s, stop_tokens=[]).tokens for s in range(3)]
    assert any(h != greedy for h in hot)  # at this temperature plain sampling leaves greedy
    for seed in range(3):
        nucleus = engine.generate(prompts, 12, temperature=5.0, top_p=1e-6, seed=seed, stop_tokens=[])
        assert nucleus.tokens == greedy


# -- (f) score ----------------------------------------------------------------------------------
def test_score_prefill_equals_decode(engine):
    # 37 tokens: three prefill steps of 16 and several chunk boundaries of 8
    ids = prompts_of([37], seed=6)[0]
    prefill = engine.score(ids, mode="prefill")
    decode = engine.score(ids, mode="decode")
    assert prefill.shape == decode.shape == (37, engine.vocab_size)
    np.testing.assert_allclose(prefill, decode, rtol=0, atol=ATOL)
    assert np.abs(prefill).max() > 1.0  # not trivially zero


def test_score_rows_equal_generate_logits(engine):
    prompt = prompts_of([10], seed=7)[0]
    out = engine.generate([prompt], 9, stop_tokens=[], return_logits=True)
    tokens, logits = out.tokens[0], out.logits[0]
    sequence = prompt + tokens
    start = len(prompt) - 1  # logits at position p choose the token at p + 1
    for mode in ("prefill", "decode"):
        scored = engine.score(sequence, mode=mode)
        assert scored.shape == (len(sequence), engine.vocab_size)
        np.testing.assert_allclose(scored[start : start + len(tokens)], logits, rtol=0, atol=ATOL)
    assert list(logits.argmax(-1)) == tokens  # greedy picks what the logits say


def test_in_place_steps_keep_one_binding_and_stay_exact(engine):
    """The ONNX Runtime runner binds the cache buffers once and rebinds only what changed
    (runtime/onnxruntime_backend.py): a cache that grows past its bucket, a second cache stepped in turn with the
    first, a cache made after one was dropped, and logits kept while later steps run all give the logits of one
    prefill over the same tokens (score's prefill path, another signature); a step binds nothing it bound before."""
    import onnxruntime as ort

    assert engine.in_place  # tiny's default attention form on ONNX Runtime (gqa) writes the cache in place
    a, b = prompts_of([14, 9], seed=11)  # 14 + 12 steps passes the 16-slot bucket; chunk 8 boundaries too
    steps = 12
    calls = []

    def counting(bind):
        def bound(self, name, *args):
            calls.append(name)
            return bind(self, name, *args)

        return bound

    def stepped(prompt, other=None):
        cache = engine.new_cache(1)
        engine.prefill(cache, [prompt])
        kept = []
        for t in range(steps):
            kept.append(engine.decode_step(cache, np.array([prompt[t % len(prompt)]]), np.array([True]))[0])
            if other is not None:  # another cache stepped between two of this one's
                engine.decode_step(other, np.array([t + 1]), np.array([True]))
        return np.stack(kept), [prompt[t % len(prompt)] for t in range(steps)]

    def expected(prompt, fed):
        return engine.score(prompt + fed, mode="prefill")[len(prompt) - 1 : len(prompt) - 1 + steps][1:]

    other = engine.new_cache(1)
    engine.prefill(other, [b])
    alone, fed = stepped(a)
    interleaved, _ = stepped(a, other)
    del other
    again, _ = stepped(a)  # a new cache, perhaps where a dropped one was
    for got in (alone, interleaved, again):
        np.testing.assert_allclose(got[:-1], expected(a, fed), rtol=0, atol=ATOL)
        np.testing.assert_array_equal(got, alone)  # the kept logits were not overwritten by later steps
    with pytest.MonkeyPatch.context() as patch:
        for method in ("bind_input", "bind_ortvalue_input", "bind_output", "bind_ortvalue_output"):
            patch.setattr(ort.IOBinding, method, counting(getattr(ort.IOBinding, method)))
        cache = engine.new_cache(1)
        engine.prefill(cache, [a])
        engine.decode_step(cache, np.array([1]), np.array([True]))
        calls.clear()
        engine.decode_step(cache, np.array([2]), np.array([True]))  # the same cache, the same bucket
    assert not [name for name in calls if name.startswith(("past_key", "past_value", "present_"))], calls


def test_a_runner_holds_a_caches_buffers_only_while_they_live_unchanged(engine):
    """KVCache.binding_key changes when a buffer is reallocated and dies with the cache; a runner holds the
    buffers of the key it last bound (so the engine feeds it the small inputs only) and of no other."""
    import gc

    runner = engine._stage_graph(engine.stages[0], "decode", False)[0]
    cache = engine.new_cache(1)
    engine.prefill(cache, [prompts_of([14], seed=12)[0]])
    key = cache.binding_key()
    assert cache.binding_key()[0] is key[0] and cache.binding_key(1) == key
    engine.decode_step(cache, np.array([3]), np.array([True]))  # 15 cached: still the 16-slot bucket
    assert runner.holds(key) and runner.holds(cache.binding_key())
    assert not runner.holds((key[0], 2))  # other rows, other views
    engine.decode_step(cache, np.array([4]), np.array([True]))
    engine.decode_step(cache, np.array([5]), np.array([True]))  # its buffers grew to 32 slots
    assert cache.binding_key()[0] is not key[0] and runner.holds(cache.binding_key()) and not runner.holds(key)
    del cache, key
    gc.collect()
    fresh = engine.new_cache(1)
    assert not runner.holds(fresh.binding_key())
    assert runner._held[0]() is None  # the dropped cache's layout is gone, not kept alive by the runner


def test_in_place_steps_from_two_threads_equal_each_alone(engine):
    """A runner keeps one binding, so in-place calls from two threads (two caches) are serialized by it: each thread
    gets what it gets alone, however the steps interleave."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = prompts_of([9, 12], seed=13)

    def run(prompt):
        cache = engine.new_cache(1)
        engine.prefill(cache, [prompt])
        return np.stack([engine.decode_step(cache, np.array([t]), np.array([True]))[0] for t in prompt[:10]])

    alone = [run(p) for p in prompts]
    with ThreadPoolExecutor(2) as pool:
        for _ in range(3):
            for got, want in zip(pool.map(run, prompts), alone):
                np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


def test_a_runners_signature_memos_stay_bounded(engine, monkeypatch):
    """Every prefill width, bucket and row count is a signature; a runner forgets them past SIGNATURES_KEPT instead of
    remembering all a server ever saw, and what it computes does not change (prefill equals decode throughout)."""
    from llama4_deploy.runtime import onnxruntime_backend

    monkeypatch.setattr(onnxruntime_backend, "SIGNATURES_KEPT", 3)
    runner = engine._stage_graph(engine.stages[0], "prefill", False)[0]
    runner._validated.clear()  # what earlier tests left: this one starts from nothing remembered
    runner._output_shapes.clear()
    ids = prompts_of([37], seed=14)[0]
    for n in (5, 9, 23, 37):
        prefill = engine.score(ids[:n], mode="prefill")
        assert len(runner._validated) <= 3 and len(runner._output_shapes) <= 3
        np.testing.assert_allclose(prefill, engine.score(ids[:n], mode="decode"), rtol=0, atol=ATOL)


def test_score_unknown_mode(engine):
    with pytest.raises(ValueError, match=r"^mode is 'beam'; use 'prefill' or 'decode'$"):
        engine.score([1, 2], mode="beam")


# -- (g) returned logits ------------------------------------------------------------------------
def test_logits_only_when_asked(engine):
    prompts = prompts_of([4, 9], seed=8)
    assert engine.generate(prompts, 5, stop_tokens=[]).logits is None
    out = engine.generate(prompts, 5, stop_tokens=[], return_logits=True)
    assert len(out.logits) == 2
    for tokens, logits in zip(out.tokens, out.logits):
        assert logits.shape == (len(tokens), engine.vocab_size) == (5, 512)
        assert logits.dtype == np.float32


def test_logits_shape_follows_a_stop(engine):
    prompt = prompts_of([4], seed=8)[0]
    free = engine.generate([prompt], 8, stop_tokens=[]).tokens[0]
    out = engine.generate([prompt], 8, stop_tokens=[free[1]], return_logits=True)
    n_new = len(out.tokens[0])
    assert n_new == free.index(free[1]) + 1 < 8
    assert out.logits[0].shape == (n_new, 512)


# -- (h) golden outputs stored in the bundle ----------------------------------------------------
def test_golden_matches_score(engine, tiny_bundle):
    with np.load(tiny_bundle / "golden.npz", allow_pickle=False) as golden:
        assert set(golden.files) == {"input_ids", "logits"}
        ids, logits = golden["input_ids"], golden["logits"]
    assert ids.ndim == 1 and len(ids) > 1
    assert logits.shape == (len(ids), engine.vocab_size)
    np.testing.assert_allclose(engine.score([int(i) for i in ids]), logits, rtol=0, atol=1e-5)
    # and the comparison is not vacuous: the logits at different positions differ by far more
    assert np.abs(logits[0] - logits[-1]).max() > 1e-2
