"""TensorRT optimization profiles of a bundle's graphs, computed from the recipe's profiles.

A TensorRT plan accepts an input shape only inside one of its optimization profiles (min/opt/max
per dynamic dimension). The engine ABI (docs/engine-abi.md) has four dynamic dimensions:

    batch    1 ... max_batch                         rows of a step
    new      1 ... prefill_tokens (1 for decode-only)  new tokens per row
    context  the global layers' cache bucket S       16, 32, ... 256, then steps of <= 1.25x, <= max_context
    ring     a chunked layer's slots R = min(C, S)

One graph file may serve several roles (gather.onnx is often both `decode` and `exact`), and a
plan is built per file, so profiles are per file: `new` runs to prefill_tokens unless the file
serves only `decode`. The cache dimension gets one profile per range of buckets, each range at
most RANGE_RATIO times its lowest bound (ends at 128, 1024, 8192, ...), so TensorRT tunes attention for a context
near the one it runs (a single 16 ... 131072 profile would tune for one end only). The runtime picks, per
step, the profile whose range holds the current bucket (runtime/tensorrt_backend.py,
`profile_index`). opt is the range's largest bucket: the step costs the most there.

Pipeline stages (`--stages N`): each stage graph file gets profiles for its own inputs, `input_ids` in
stage 0, `hidden_states` [batch, new, hidden] after it, and only its own layers' `past_*`. A stage
whose layers are all chunked sees no context bucket, only rings of R = min(C, S) slots, so its
profiles' `cache_slots` range over R (what the runtime then selects on, `cache_slots`), and a
profile whose ring range lies inside the one before it is dropped (rings stop growing at C).

Images (a bundle with `engine.vision`): three more graph files, each with its own plan.

    vision.onnx            pixel_values [tiles, channels, side, side]: one profile, tiles 1 ... max_tiles (the
                           recipe's images per step x (max_patches + 1)), opt at one image's largest grid
                           (max_patches + 1 tiles: the runtime runs the vision engine once per image)
    embed.onnx             input_ids [batch, new]: one profile, as the prefill's
    embeds.<dispatch>.onnx the prefill graph taking hidden_states [batch, new, hidden] (and the exact rerun's
                           graph): the cache profiles of the first stage's layers, as a later stage's graph gets
"""

from __future__ import annotations

from typing import Any

from llama4_deploy.runtime import abi

MIN_BUCKET = 16  # runtime/kv_cache.py's smallest bucket
RANGE_RATIO = 8  # largest / smallest bucket of one profile's cache range


def cache_ranges(max_context: int) -> list[tuple[int, int]]:
    """[(lowest, highest) cache slots] covering MIN_BUCKET ... max_context, contiguous, each at most
    RANGE_RATIO times its lowest bound."""
    if max_context < 1:
        raise ValueError(f"max_context is {max_context}; it must be positive")
    low = min(MIN_BUCKET, max_context)
    top = MIN_BUCKET  # ranges end at 16 * 8^i: 128, 1024, 8192, ...
    ranges = []
    while True:
        top *= RANGE_RATIO
        high = min(top, max_context)
        ranges.append((low, high))
        if high == max_context:
            return ranges
        low = high + 1


def _dims(low: int, opt: int, high: int) -> dict[str, int]:
    return {"min": low, "opt": opt, "max": high}


def file_profiles(
    roles: list[str],
    profiles: dict[str, int],
    model: dict[str, Any],
    layers: list[dict[str, Any]],
    first_input: str = abi.INPUT_IDS,
) -> list[dict[str, Any]]:
    """The optimization profiles of one graph file serving `roles` (prefill, decode, exact), whose
    graph takes `first_input` (input_ids, or a later stage's hidden_states) and the caches of `layers`.

    Each: {"cache_slots": [low, high], "shapes": {input: {"min": [...], "opt": [...], "max": [...]}}}."""
    batch = profiles["max_batch"]
    new_max = 1 if set(roles) == {"decode"} else profiles["prefill_tokens"]
    chunk = model["attention_chunk_size"]
    kv_heads, head_dim = model["num_kv_heads"], model["head_dim"]
    out = []
    for low, high in cache_ranges(profiles["max_context"]):
        dims = {
            "batch": _dims(1, batch, batch),
            "new": _dims(1, new_max, new_max),
            "context": _dims(low, high, high),
            "ring": _dims(min(chunk, low), min(chunk, high), min(chunk, high)),
        }

        def shape(*names, dims=dims):
            return {key: [dims[n][key] if isinstance(n, str) else n for n in names] for key in ("min", "opt", "max")}

        first = shape("batch", "new") if first_input == abi.INPUT_IDS else shape("batch", "new", model["hidden_size"])
        shapes = {first_input: first, abi.POSITION_IDS: shape("batch", "new"), abi.PAST_LENGTHS: shape("batch")}
        for layer in layers:
            slots = "ring" if layer["attention"] == "chunked" else "context"
            for name in abi.past_names([layer["index"]]):
                shapes[name] = shape("batch", kv_heads, slots, head_dim)
        out.append({"cache_slots": [low, high], "shapes": shapes})
    if any(layer["attention"] == "global" for layer in layers):
        return out
    rings: list[dict[str, Any]] = []  # only rings: select on R = min(C, S)
    for profile in out:
        low, high = (min(chunk, bound) for bound in profile["cache_slots"])
        if rings and rings[-1]["cache_slots"][0] <= low and high <= rings[-1]["cache_slots"][1]:
            continue
        rings.append({**profile, "cache_slots": [low, high]})
    return rings


def bundle_profiles(
    graphs: dict[str, dict[str, Any]],
    profiles: dict[str, int],
    model: dict[str, Any],
    layers: list[dict[str, Any]],
    first_input: str = abi.INPUT_IDS,
) -> dict[str, list[dict[str, Any]]]:
    """{graph file: its profiles} for a manifest's `engine.graphs` (role -> record with `file`), or for one
    stage's graphs (its `layers`, its `first_input`)."""
    roles: dict[str, list[str]] = {}
    for role, record in graphs.items():
        roles.setdefault(record["file"], []).append(role)
    return {file: file_profiles(file_roles, profiles, model, layers, first_input) for file, file_roles in roles.items()}


def stage_profiles(
    stages: list[dict[str, Any]], profiles: dict[str, int], model: dict[str, Any], layers: list[dict[str, Any]]
) -> dict[str, list[dict[str, Any]]]:
    """{graph file: its profiles} over every pipeline stage of a manifest (`engine.stages` records: `layers`
    [start, stop), `graphs`, `inputs`, and on the first stage of a vision bundle `embeddings`); one stage gives
    bundle_profiles of the whole model."""
    out: dict[str, list[dict[str, Any]]] = {}
    for stage in stages:
        start, stop = stage["layers"]
        own = [layer for layer in layers if start <= layer["index"] < stop]
        out.update(bundle_profiles(stage["graphs"], profiles, model, own, stage["inputs"][0]))
        embeddings = stage.get("embeddings")
        if embeddings:
            out.update(embeddings_profiles(embeddings, profiles, model, own))
    return out


def embeddings_profiles(
    embeddings: dict[str, str | None], profiles: dict[str, int], model: dict[str, Any], layers: list[dict[str, Any]]
) -> dict[str, list[dict[str, Any]]]:
    """{graph file: its profiles} of the embedding step (`embed`: input_ids -> hidden_states) and of the prefill
    graphs that take its hidden_states (`prefill`, and `exact` where the capacity dispatch reruns), over the
    caches of `layers` (the first stage's)."""
    batch, new = profiles["max_batch"], profiles["prefill_tokens"]
    dims = {"min": [1, 1], "opt": [batch, new], "max": [batch, new]}
    out: dict[str, list[dict[str, Any]]] = {embeddings["embed"]: [{"shapes": {abi.INPUT_IDS: dims}}]}
    for role in ("prefill", "exact"):
        if embeddings.get(role):
            out[embeddings[role]] = file_profiles(["prefill"], profiles, model, layers, abi.HIDDEN_IN)
    return out


def vision_profiles(vision: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """{vision graph file: its one profile}: pixel_values [tiles, channels, side, side] with tiles from 1 to the
    bundle's max_tiles, optimized for one image's largest grid (max_patches tiles and the global one), what each
    vision run is fed (one run per image). `vision`: the manifest's engine.vision record."""
    side, channels = vision["image"]["tile_size"], vision["config"]["num_channels"]
    high, patches = vision["max_tiles"], vision["image"]["max_patches"]
    opt = min(patches + (1 if patches > 1 else 0), high)  # one tile alone has no global tile beside it
    return {
        vision["file"]: [
            {
                "shapes": {
                    vision["input"]: {
                        "min": [1, channels, side, side],
                        "opt": [opt, channels, side, side],
                        "max": [high, channels, side, side],
                    }
                }
            }
        ]
    }
