"""verify's image rows: a vision bundle against transformers' `Llama4ForConditionalGeneration`.

- `vision`: the vision engine's features for the same pixel values against `get_image_features` followed by the
  projector, one row per image (tile grids 1x1, 1x2 and 2x2 where max_patches allows). The tower is float32 at every
  precision (export/vision.py), so these rows keep the fp32 tolerance at every precision;
- `image generate`: greedy generation with one image, and with two images of different grids, against the
  reference's logits over the same sequence (its forward's own steps, export/reference.py `multimodal_logits`,
  teacher-forced on the engine's tokens). For an fp32 bundle the reference is the fp32 model; for an fp16, FP8 or
  INT4 bundle its language model is first turned into the fake-quant simulation of the bundle's spec
  (export/simulate.py, the same as the text rows'), and each row is checked exactly as the text rows are (verify's
  `checked`: the spec's tolerance, and where activations are rounded the rounding-tie noise floor, the typical
  position and the pooled greedy agreement); the quality against the fp32 model is reported as for the text rows.

The images are written here (a seeded gradient plus noise), the pixel values are the runtime's own preprocessing
(equal to the reference processor's, tests/runtime/test_images.py), and the expanded ids are the runtime's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llama4_deploy.quality.compare import compare, relative_logit_tolerance
from llama4_deploy.runtime import images as im

REL_TOLERANCE = 1e-3  # fp32 engine vs fp32 eager, as the text rows: summation order only


def test_images(tile: int, max_patches: int) -> list[tuple[str, np.ndarray]]:
    """(grid name, HWC uint8 image) for the grids this processor can make: 1x1, 1x2, 2x2."""
    rng = np.random.default_rng(4321)
    sizes = [("1x1", (tile, tile))]
    if max_patches >= 2:
        sizes.append(("1x2", (tile, 2 * tile)))
    if max_patches >= 4:
        sizes.append(("2x2", (2 * tile, 2 * tile)))
    out = []
    for name, (height, width) in sizes:
        y, x = np.mgrid[0:height, 0:width]
        base = (x * 255 // max(width - 1, 1) + y * 127 // max(height - 1, 1))[..., None]
        out.append((name, ((base + rng.integers(0, 64, size=(height, width, 3))) % 256).astype(np.uint8)))
    return out


def image_rows(
    engine,
    source: dict[str, Any],
    new_tokens: int,
    log,
    row_type,
    checked=None,
    simulation=None,
    pooled: bool = False,
) -> tuple[list, dict[str, Any] | None]:
    """The image rows of verify's report (`row_type`: verify's Row), and for a non-fp32 bundle the image prompts'
    quality against the fp32 model (None for fp32). `checked(actual, expected, generated)`: verify's comparison of
    the text rows, (max|dlogit| comparison, typical-position comparison or None); default the fp32 rule.
    `simulation(language_model)`: turns the reference's language model into the bundle's fake-quant simulation, in
    place (None: the bundle is fp32). `pooled`: greedy agreement is checked over all rows together (specs that
    round activations), as for the text rows."""
    import torch

    from llama4_deploy.export.reference import multimodal_logits, multimodal_reference
    from llama4_deploy.export.simulate import quality as measure
    from llama4_deploy.export.vision import reference_features

    if checked is None:

        def checked(actual, expected, generated):
            return compare(actual, expected, relative_logit_tolerance(expected, REL_TOLERANCE)), None

    model = multimodal_reference(source)
    spec, tokens = engine.image_spec, engine.image_tokens
    pictures = test_images(spec.tile_size, spec.max_patches)
    rows = []
    for index, (grid, picture) in enumerate(pictures):
        prepared = im.preprocess(picture, spec)
        got = engine.encode_images([prepared]).reshape(prepared.tiles, -1, engine.manifest.model["hidden_size"])
        want = reference_features(model, torch.from_numpy(prepared.pixel_values)).numpy()
        comparison = compare(got, want, relative_logit_tolerance(want, REL_TOLERANCE))
        rows.append(row_type(f"vision {grid}", index, prepared.tiles, comparison, 0, 0))
    reserved = set(engine.vision["tokens"].values())
    rng = np.random.default_rng(99)
    text = [int(t) for t in rng.integers(0, engine.vocab_size, size=64) if int(t) not in reserved]
    cases = [[pictures[-1]]]  # the largest grid alone, then two images of different grids
    if len(pictures) > 1:
        cases.append([pictures[0], pictures[-1]])
    log(f"[verify] image generation: {len(cases)} prompts, {new_tokens} tokens each")
    prompts, sources = [], []
    for case in cases:
        prompt = text[:5]
        for n in range(len(case)):
            prompt = prompt + [tokens.image] + text[5 + 3 * n : 8 + 3 * n]
        prompts.append(prompt)
        sources.append([picture for _, picture in case])
    generation = engine.generate(prompts, new_tokens, images=sources, stop_tokens=[], return_logits=True)
    sequences = []  # (expanded prompt ids, generated tokens, pixel values, grids) per prompt
    for prompt, given, new in zip(prompts, sources, generation.tokens):
        prepared = [im.preprocess(s, spec) for s in given]
        ids = im.expand_placeholders(prompt, prepared, spec.tokens_per_tile, tokens)
        grids = "+".join(f"{p.aspect_ratio[0]}x{p.aspect_ratio[1]}" for p in prepared)
        sequences.append((ids, new, np.concatenate([p.pixel_values for p in prepared]), grids))

    def generated_logits(ids, new, pixels):
        out = multimodal_logits(model, ids + new, pixels, len(ids))
        return out[len(ids) - 1 : len(ids) - 1 + len(new)]

    quality = None
    if simulation is not None:  # the fp32 model's logits first: the simulation changes the model in place
        full = [generated_logits(ids, new, pixels) for ids, new, pixels, _ in sequences]
        log("[verify] image rows against the fake-quant simulation of the bundle's spec")
        simulation(model.language_model)
        quality = measure(np.concatenate(generation.logits), np.concatenate(full))
    for index, ((ids, new, pixels, grids), logits) in enumerate(zip(sequences, generation.logits)):
        expected = generated_logits(ids, new, pixels)
        agree = int((expected.argmax(-1) == np.asarray(new)).sum())
        comparison, typical = checked(logits, expected, True)
        rows.append(row_type(f"image {grids}", index, len(new), comparison, agree, len(new), typical, pooled))
    return rows, quality
