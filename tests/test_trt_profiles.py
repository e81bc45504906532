"""llama4_deploy/targets/tensorrt_profiles.py: TensorRT optimization profiles from a recipe's profiles."""

from __future__ import annotations

import pytest

from llama4_deploy.runtime import abi
from llama4_deploy.runtime.kv_cache import context_bucket
from llama4_deploy.targets.tensorrt_profiles import bundle_profiles, cache_ranges, file_profiles

MODEL = {"attention_chunk_size": 8192, "num_kv_heads": 8, "head_dim": 128}
LAYERS = [{"index": 0, "attention": "chunked"}, {"index": 1, "attention": "global"}]
PROFILES = {"max_batch": 4, "prefill_tokens": 2048, "max_context": 32768}


def test_cache_ranges_cover_every_bucket_once():
    assert cache_ranges(32768) == [(16, 128), (129, 1024), (1025, 8192), (8193, 32768)]
    assert cache_ranges(256) == [(16, 128), (129, 256)]
    assert cache_ranges(10) == [(10, 10)]
    for max_context in (10, 256, 1000, 32768):
        ranges = cache_ranges(max_context)
        for tokens in range(0, max_context + 1, 7):
            bucket = context_bucket(tokens, max_context)
            assert sum(low <= bucket <= high for low, high in ranges) == 1, (max_context, bucket)
    with pytest.raises(ValueError, match="positive"):
        cache_ranges(0)


def test_file_profiles_shapes():
    prefill = file_profiles(["prefill"], PROFILES, MODEL, LAYERS)
    assert [p["cache_slots"] for p in prefill] == [[16, 128], [129, 1024], [1025, 8192], [8193, 32768]]
    last = prefill[-1]["shapes"]
    assert last[abi.INPUT_IDS] == {"min": [1, 1], "opt": [4, 2048], "max": [4, 2048]}
    assert last[abi.PAST_LENGTHS] == {"min": [1], "opt": [4], "max": [4]}
    # chunked layers' rings stop at the chunk; global layers' caches follow the context bucket
    assert last[abi.past_key(0)] == {"min": [1, 8, 8192, 128], "opt": [4, 8, 8192, 128], "max": [4, 8, 8192, 128]}
    assert last[abi.past_value(1)] == {"min": [1, 8, 8193, 128], "opt": [4, 8, 32768, 128], "max": [4, 8, 32768, 128]}
    assert prefill[0]["shapes"][abi.past_key(0)]["min"] == [1, 8, 16, 128]
    decode = file_profiles(["decode"], PROFILES, MODEL, LAYERS)
    assert decode[0]["shapes"][abi.POSITION_IDS] == {"min": [1, 1], "opt": [4, 1], "max": [4, 1]}


def test_bundle_profiles_per_file():
    """gather.onnx serving decode and exact takes prefill-sized steps too (the rerun of a prefill step)."""
    graphs = {"prefill": {"file": "capacity.onnx"}, "decode": {"file": "gather.onnx"}, "exact": {"file": "gather.onnx"}}
    profiles = bundle_profiles(graphs, PROFILES, MODEL, LAYERS)
    assert set(profiles) == {"capacity.onnx", "gather.onnx"}
    assert profiles["gather.onnx"][0]["shapes"][abi.INPUT_IDS]["max"] == [4, 2048]
    only_decode = bundle_profiles({"decode": {"file": "gather.onnx"}}, PROFILES, MODEL, LAYERS)
    assert only_decode["gather.onnx"][0]["shapes"][abi.INPUT_IDS]["max"] == [4, 1]


def test_vision_and_embeddings_profiles():
    """A vision bundle's three more plans: the vision graph's tiles run 1 ... images per step x (max_patches + 1),
    optimized for one image's largest grid; the embedding step as the prefill's ids; the prefill graphs that take
    hidden_states over the first stage's caches."""
    from llama4_deploy.targets.tensorrt_profiles import embeddings_profiles, stage_profiles, vision_profiles

    vision = {
        "file": "vision.onnx",
        "input": "pixel_values",
        "max_tiles": 2 * (16 + 1),
        "image": {"tile_size": 336, "max_patches": 16},
        "config": {"num_channels": 3},
    }
    assert vision_profiles(vision) == {
        "vision.onnx": [
            {"shapes": {"pixel_values": {"min": [1, 3, 336, 336], "opt": [17, 3, 336, 336], "max": [34, 3, 336, 336]}}}
        ]
    }
    one_tile = {**vision, "max_tiles": 2, "image": {"tile_size": 336, "max_patches": 1}}
    assert vision_profiles(one_tile)["vision.onnx"][0]["shapes"]["pixel_values"]["opt"][0] == 1
    model = {**MODEL, "hidden_size": 5120}
    embeddings = {"embed": "embed.onnx", "prefill": "embeds.capacity.onnx", "exact": None}
    files = embeddings_profiles(embeddings, PROFILES, model, LAYERS)
    assert set(files) == {"embed.onnx", "embeds.capacity.onnx"}
    assert files["embed.onnx"] == [{"shapes": {abi.INPUT_IDS: {"min": [1, 1], "opt": [4, 2048], "max": [4, 2048]}}}]
    prefill = files["embeds.capacity.onnx"]
    assert prefill == file_profiles(["prefill"], PROFILES, model, LAYERS, abi.HIDDEN_IN)
    assert prefill[-1]["shapes"][abi.HIDDEN_IN] == {"min": [1, 1, 5120], "opt": [4, 2048, 5120], "max": [4, 2048, 5120]}
    # two stages: the embeddings prefill graph covers the first stage's layers only, as that stage's own graphs
    stages = [
        {
            "layers": [0, 1],
            "graphs": {"prefill": {"file": "stage0.capacity.onnx"}},
            "inputs": [abi.INPUT_IDS],
            "embeddings": {**embeddings, "prefill": "stage0.embeds.capacity.onnx", "embed": "stage0.embed.onnx"},
        },
        {"layers": [1, 2], "graphs": {"prefill": {"file": "stage1.capacity.onnx"}}, "inputs": [abi.HIDDEN_IN]},
    ]
    by_file = stage_profiles(stages, PROFILES, model, LAYERS)
    assert set(by_file["stage0.embeds.capacity.onnx"][0]["shapes"]) == {
        abi.HIDDEN_IN,
        abi.POSITION_IDS,
        abi.PAST_LENGTHS,
        abi.past_key(0),
        abi.past_value(0),
    }
    assert "stage0.embed.onnx" in by_file
