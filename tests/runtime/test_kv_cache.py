"""The KV cache sized by the filled context: buckets, short rings, growth, zero-copy feeds, and
exactness against transformers at every boundary (bucket, chunk, ragged rows, long prefill steps),
including Llama 4's real chunk of 8192 with NoPE temperature tuning active past it."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from llama4_deploy.build import build
from llama4_deploy.build.recipe import load_recipe
from llama4_deploy.export.reference import reference_logits, reference_model
from llama4_deploy.quality.compare import compare, relative_logit_tolerance
from llama4_deploy.quality.verify import verify
from llama4_deploy.runtime import abi, load
from llama4_deploy.runtime.kv_cache import KVCache, context_bucket

# fp32 engine vs fp32 eager: only the order of floating-point sums differs (~1e-6 relative); the
# recipes' peaked heads keep greedy choices whole units apart. Same bound as `verify`.
REL_TOLERANCE = 1e-3


def recipe_file(tmp_path, name: str, config: dict, profiles: dict, verify_settings: dict | None = None):
    """A recipe YAML: tiny's seeded random weights with some config keys and the profiles replaced."""
    tiny = load_recipe("tiny").model_dump()
    recipe = {
        "name": name,
        "description": f"tiny with {config}",
        "random": {**tiny["random"], "config": {**tiny["random"]["config"], **config}},
        "profiles": profiles,
    }
    if verify_settings:
        recipe["verify"] = verify_settings
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


# -- the cache on its own ------------------------------------------------------------------------
class FakeManifest:
    """What KVCache reads from a manifest: 2 chunked layers (C = 40) and 1 global layer."""

    def __init__(self, chunk=40, context=160):
        from llama4_deploy.runtime.bundle import LayerCache

        self.model = {"num_kv_heads": 2, "head_dim": 4, "attention_chunk_size": chunk}
        self.layers = [LayerCache(0, "chunked", chunk), LayerCache(1, "chunked", chunk), LayerCache(2, "global", None)]
        self.max_context = context
        self.engine = {"cache_dtype": "float32"}
        self.profiles = {"max_batch": 4}


def present(batch, tokens, seed):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal((batch, 2, tokens, 4)).astype(np.float32) for name in abi.present_names(range(3))}


def test_buckets_double_up_to_256_then_grow_by_at_most_a_quarter_capped_by_the_context():
    assert [context_bucket(n, 160) for n in (0, 1, 16, 17, 33, 64, 65, 129, 160)] == [
        16,
        16,
        16,
        32,
        64,
        64,
        128,
        160,
        160,
    ]
    assert [context_bucket(n, 10**6) for n in (256, 257, 320, 321, 4096, 4097, 5121, 7169)] == [
        256,
        320,
        320,
        384,
        4096,
        5120,
        6144,
        8192,
    ]
    buckets = sorted({context_bucket(n, 10**6) for n in range(1, 8193)})
    assert len(buckets) == 25 and all(b / a <= 1.25 for a, b in zip(buckets[4:], buckets[5:]))
    assert all(context_bucket(n, 10**6) <= 1.25 * n for n in range(257, 8193))  # at most 20% of slots empty


def test_rings_follow_the_context_up_to_the_chunk_and_feeds_are_the_buffers_themselves():
    cache = KVCache(FakeManifest(), 2)
    slots = lambda: [cache.feeds()[abi.past_key(layer)].shape[2] for layer in range(3)]
    assert slots() == [16, 16, 16]
    steps = [(20, [32, 32, 32]), (20, [40, 40, 64]), (30, [40, 40, 128])]  # rings stop at C
    done = 0
    for seed, (tokens, expected) in enumerate(steps):
        positions = np.tile(np.arange(done, done + tokens), (2, 1))
        cache.write(present(2, tokens, seed), positions)
        done += tokens
        assert slots() == expected
        feeds = cache.feeds()  # what the engine is fed is the buffer: no copy
        assert list(feeds) == abi.past_names(range(3))
        for layer in range(3):
            assert feeds[abi.past_key(layer)] is cache.keys[layer]
            assert feeds[abi.past_value(layer)] is cache.values[layer]
        assert all(array.flags["C_CONTIGUOUS"] for array in feeds.values())
    assert cache.grown == 3
    assert cache.kv_bytes_read() == 2 * 2 * 2 * 4 * 4 * (40 + 40 + 128)


def test_growth_keeps_every_position_at_its_slot_and_rings_keep_the_newest_chunk():
    cache = KVCache(FakeManifest(), 2)
    written = {}  # (layer, row, position) -> key vector
    lengths = [0, 0]
    for seed, widths in enumerate([(5, 17), (30, 1), (1, 45), (50, 3)]):  # ragged rows, one step > C
        T = max(widths)
        positions = np.full((2, T), -1)
        for row, width in enumerate(widths):
            positions[row, :width] = np.arange(lengths[row], lengths[row] + width)
            lengths[row] += width
        outputs = present(2, T, seed)
        cache.write(outputs, positions)
        for row in range(2):
            for t, p in enumerate(positions[row]):
                if p >= 0:
                    for layer in range(3):
                        written[(layer, row, int(p))] = outputs[abi.present_key(layer)][row, :, t]
    assert cache.lengths.tolist() == lengths
    for row in range(2):
        for layer in range(3):
            ring = 40 if layer < 2 else 0
            for p in range(lengths[row]):
                if ring and p < lengths[row] - ring:
                    continue  # overwritten by a newer position of the ring
                slot = p % ring if ring else p
                np.testing.assert_array_equal(cache.keys[layer][row, :, slot], written[(layer, row, p)])


def test_a_write_beyond_the_context_is_refused():
    cache = KVCache(FakeManifest(context=32), 1)
    with pytest.raises(ValueError, match="beyond the bundle's context of 32 tokens"):
        cache.write(present(1, 1, 0), np.array([[32]]))


def test_reset_row_empties_one_row_and_rejects_a_row_outside_the_cache():
    cache = KVCache(FakeManifest(), 3)
    cache.write(present(3, 5, 0), np.tile(np.arange(5), (3, 1)))
    before = cache.keys[2].copy()
    cache.reset_row(1)
    assert cache.lengths.tolist() == [5, 0, 5]
    np.testing.assert_array_equal(cache.keys[2], before)  # stale slots stay; only the length says they are gone
    with pytest.raises(ValueError, match="row 3 is outside this cache's 3 rows"):
        cache.reset_row(3)


def test_a_recycled_row_computes_as_a_fresh_cache(tiny_bundle):
    # row 0 first holds 40 tokens (past tiny's chunk of 8: its rings wrapped, every slot stale),
    # then is reset and fed a 12-token prompt while row 1 keeps decoding: its logits equal a
    # fresh single-row cache's up to summation order (engine vs engine, see test_engine.ATOL).
    rng = np.random.default_rng(3)
    old, new, other = (rng.integers(0, 512, size=n).tolist() for n in (40, 12, 9))
    with load(tiny_bundle) as engine:
        cache = KVCache(engine.manifest, 2)
        engine.prefill(cache, [old, other])
        cache.reset_row(0)
        recycled, _ = engine.prefill(cache, [new, []])
        fresh, _ = engine.prefill(KVCache(engine.manifest, 1), [new])
        np.testing.assert_allclose(recycled[0], fresh[0], atol=1e-4)
        assert cache.lengths.tolist() == [12, 9]


# -- exact at every boundary, against transformers ------------------------------------------------
def test_boundaries_of_buckets_and_a_chunk_longer_than_the_first_buckets(tmp_path):
    # C = 40: rings are 16, then 32 slots long while every row is short, then 40 and wrapping.
    # Prompts are ragged and cross the buckets (16, 32, 64) and the chunk at different steps;
    # the prefill step (24) is longer than what is left of the first bucket; 32 new tokens
    # cross more boundaries on the decode path. verify checks generate and score on both paths.
    path = recipe_file(
        tmp_path,
        "tiny-c40",
        {"attention_chunk_size": 40},
        {"max_batch": 4, "prefill_tokens": 24, "max_context": 160},
        {"prompt_lengths": [15, 33, 47, 81], "new_tokens": 32},
    )
    bundle = build(str(path), out=tmp_path / "bundle", log=lambda _: None).bundle
    report = verify(bundle, log=lambda _: None)
    assert report.ok, report.table()
    assert {row.path for row in report.rows} == {"generate", "score:prefill", "score:decode"}


@pytest.fixture(scope="module")
def long_context(tmp_path_factory):
    """Tiny widths at Llama 4's real chunk (8192) and temperature floor (8192)."""
    tmp = tmp_path_factory.mktemp("chunk8192")
    path = recipe_file(
        tmp,
        "tiny-c8192",
        {"attention_chunk_size": 8192, "floor_scale": 8192, "max_position_embeddings": 16384},
        {"max_batch": 2, "prefill_tokens": 2048, "max_context": 8448},
    )
    bundle = build(str(path), out=tmp / "bundle", log=lambda _: None).bundle
    with load(bundle) as engine:
        yield engine


def test_real_chunk_size_prefill_and_decode_across_the_boundary(long_context):
    engine = long_context
    rng = np.random.default_rng(5)
    prompt = [int(t) for t in rng.integers(0, engine.vocab_size, 8170)]
    # the decode path: 40 greedy tokens from position 8170, across the chunk boundary at 8192,
    # where the rings wrap and the NoPE temperature first rises (floor((p + 1) / 8192) = 1)
    generation = engine.generate([prompt], 40, stop_tokens=[], return_logits=True)
    sequence = prompt + generation.tokens[0]
    reference = reference_logits(reference_model(engine.manifest.raw["source"]), sequence)
    expected = reference[len(prompt) - 1 : len(sequence) - 1]
    decoded = compare(generation.logits[0], expected, relative_logit_tolerance(expected, REL_TOLERANCE))
    assert decoded.ok, decoded
    assert generation.tokens[0] == expected.argmax(-1).tolist()
    # the prefill path over the whole sequence: steps of 2048, the last one crossing the boundary
    scored = engine.score(sequence, mode="prefill")
    tail = slice(8000, len(sequence))  # before, across and after the boundary
    prefilled = compare(scored[tail], reference[tail], relative_logit_tolerance(reference[tail], REL_TOLERANCE))
    assert prefilled.ok, prefilled
    assert (scored.argmax(-1) == reference.argmax(-1)).all()


def test_real_chunk_size_ragged_rows_one_before_one_after_the_boundary(long_context):
    engine = long_context
    rng = np.random.default_rng(6)
    prompts = [[int(t) for t in rng.integers(0, engine.vocab_size, n)] for n in (8189, 8200)]
    batched = engine.generate(prompts, 8, stop_tokens=[], return_logits=True)
    for prompt, tokens, logits in zip(prompts, batched.tokens, batched.logits):
        alone = engine.generate([prompt], 8, stop_tokens=[], return_logits=True)
        assert tokens == alone.tokens[0]
        np.testing.assert_allclose(logits, alone.logits[0], atol=1e-4)  # summation order only


def test_in_place_steps_are_cut_at_chunk_boundaries_and_reserved_before_they_run():
    # C = 40, context 160: what the gqa form's runtime asks before each in-place step (runtime/engine.py)
    cache = KVCache(FakeManifest(), 2)
    busy, one_idle = np.array([False, False]), np.array([False, True])
    assert cache.step_width(64, busy) == 40  # from a chunk start: the whole chunk
    cache.lengths[:] = [35, 0]
    assert cache.step_width(64, busy) == 5  # row 0 reaches its chunk's end at 40
    cache.lengths[:] = [40, 79]
    assert cache.step_width(64, busy) == 1 and cache.step_width(64, np.array([True, False])) == 1
    cache.lengths[:] = [80, 0]
    assert cache.step_width(64, one_idle) == 39  # an idle row counts at least one slot of past
    cache.reserve_step(39, one_idle)
    assert cache.keys[2].shape[2] == 128 and cache.keys[0].shape[2] == 40  # 80 + 39 slots fit before the step
    cache.lengths[:] = [159, 3]
    assert cache.step_width(8, busy) == 1
    cache.lengths[:] = [160, 3]
    with pytest.raises(ValueError, match="a row of this cache is full"):
        cache.step_width(1, np.array([True, False]))
    cache.lengths[:] = [10, 3]
    cache.advance(np.array([[10, 11, -1], [3, -1, -1]]))
    assert cache.lengths.tolist() == [12, 4]
