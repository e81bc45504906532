"""runtime/images.py (numpy + Pillow) against transformers' Llama4ImageProcessor and Llama4Processor.

Tolerance: pixel values within 1e-5 (the issue's bound). Both sides produce bfloat16 values (the reference
normalizes in bfloat16), whose spacing near 1 is 2**-7: a single uint8 level of difference after resizing would
show as >= 0.0078, so passing 1e-5 means the resized pixels and the rounding are identical.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from llama4_deploy.runtime import images as im
from tests.vision_reference import run_reference

PIXEL_TOLERANCE = 1e-5


def _noise(height: int, width: int, channels: int, seed: int) -> np.ndarray:
    """A smooth gradient plus noise: both flat regions and every-level detail for the resampler."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = (x * 255 // max(width - 1, 1) + y * 127 // max(height - 1, 1))[..., None]
    noise = rng.integers(0, 96, size=(height, width, channels))
    return ((base + noise) % 256).astype(np.uint8)


def _jpeg_with_orientation(orientation: int, seed: int) -> bytes:
    image = Image.fromarray(_noise(240, 400, 3, seed))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _palette(height: int, width: int, seed: int, transparent: bool) -> Image.Image:
    image = Image.fromarray(_noise(height, width, 3, seed)).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    if transparent:
        image.info["transparency"] = 3
    return image


def _rgba(height: int, width: int, seed: int) -> Image.Image:
    pixels = _noise(height, width, 4, seed)
    pixels[: height // 3, :, 3] = 0  # a fully transparent band, and partial alpha elsewhere
    return Image.fromarray(pixels, mode="RGBA")


# (name, source) where source is what the runtime is given: PIL image, array, file bytes
CASES = {
    "square-one-tile": lambda: Image.fromarray(_noise(336, 336, 3, 1)),
    "square-500": lambda: Image.fromarray(_noise(500, 500, 3, 2)),
    "square-1344-exact-4x4": lambda: Image.fromarray(_noise(1344, 1344, 3, 3)),
    "wide-1000x200": lambda: Image.fromarray(_noise(200, 1000, 3, 4)),
    "wide-5000x90-16-across": lambda: Image.fromarray(_noise(90, 5000, 3, 5)),
    "tall-200x1000": lambda: Image.fromarray(_noise(1000, 200, 3, 6)),
    "tall-odd-1009x673": lambda: Image.fromarray(_noise(1009, 673, 3, 7)),
    "just-over-a-tile-337": lambda: Image.fromarray(_noise(336, 337, 3, 8)),
    "tiny-20x30": lambda: Image.fromarray(_noise(20, 30, 3, 9)),
    "tiny-1x1": lambda: Image.fromarray(_noise(1, 1, 3, 10)),
    "tiny-7x300": lambda: Image.fromarray(_noise(7, 300, 3, 11)),
    "more-than-16-tiles-1700x1500": lambda: Image.fromarray(_noise(1500, 1700, 3, 12)),
    "grayscale-L": lambda: Image.fromarray(_noise(300, 400, 1, 13)[:, :, 0], mode="L"),
    "grayscale-LA": lambda: Image.fromarray(_noise(300, 410, 2, 14), mode="LA"),
    "rgba-transparent": lambda: _rgba(450, 300, 15),
    "palette-transparent": lambda: _palette(200, 350, 16, transparent=True),
    "palette-opaque": lambda: _palette(380, 520, 17, transparent=False),
    "exif-rotated-jpeg-6": lambda: _jpeg_with_orientation(6, 18),
    "exif-rotated-jpeg-8": lambda: _jpeg_with_orientation(8, 19),
    "exif-flipped-jpeg-3": lambda: _jpeg_with_orientation(3, 20),
    "png-bytes": lambda: _encoded(Image.fromarray(_noise(700, 900, 3, 21)), "PNG"),
    "webp-bytes": lambda: _encoded(Image.fromarray(_noise(330, 660, 3, 22)), "WEBP", lossless=True),
    "hwc-array": lambda: _noise(400, 800, 3, 23),
    "hwc-rgba-array": lambda: _noise(260, 390, 4, 24),
}


def _save_input(source, path):
    """Where the reference reads the same input (tests/vision_reference.py `_load_input`)."""
    if isinstance(source, np.ndarray):
        np.save(path.with_suffix(".npy"), source)
        return {"kind": "array", "path": str(path.with_suffix(".npy"))}
    if isinstance(source, bytes):
        path.write_bytes(source)
        return {"kind": "file", "path": str(path)}
    source.save(path.with_suffix(".png"))  # PNG keeps the mode: L, LA, P with its transparency, RGB, RGBA
    return {"kind": "pil", "path": str(path.with_suffix(".png"))}


PUBLISHED = im.ImageSpec()  # Scout/Maverick's processor: tiles of 336, at most 16
TINY = im.ImageSpec(tile_size=56, max_patches=4)


IDS_CASES = ("wide-1000x200", "tiny-20x30", "square-1344-exact-4x4", "png-bytes")
TEXTS = [("w3 <|image|> w4 w5", IDS_CASES[:1]), ("<|image|> w6 <|image|> w7 <|image|>", IDS_CASES[1:]), ("w3 w4", ())]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Every case through the reference processor at both tile geometries, and the processor's input_ids for the
    texts, in one child process."""
    from tests.vision_fixtures import write_image_tokenizer

    work = tmp_path_factory.mktemp("images")
    write_image_tokenizer(work, 512)
    jobs, keys, saved = [], [], {}
    for name in sorted(CASES):
        saved[name] = _save_input(CASES[name](), work / name)
        for spec in (PUBLISHED, TINY):
            jobs.append(
                {"op": "pixels", "image": saved[name], "tile_size": spec.tile_size, "max_patches": spec.max_patches}
            )
            keys.append((name, spec.tile_size))
    for spec in (PUBLISHED, TINY):
        for text, chosen in TEXTS:
            jobs.append(
                {
                    "op": "ids",
                    "text": text,
                    "images": [saved[n] for n in chosen],
                    "tokenizer": str(work),
                    "tile_size": spec.tile_size,
                    "max_patches": spec.max_patches,
                }
            )
            keys.append((text, spec.tile_size))
    results = dict(zip(keys, run_reference(jobs, work / "reference")))
    results["tokenizer"] = work / "tokenizer.json"
    return results


@pytest.mark.parametrize("case", sorted(CASES))
def test_pixels_equal_reference(case, reference):
    source = CASES[case]()
    for spec in (PUBLISHED, TINY):
        expected = reference[(case, spec.tile_size)]
        prepared = im.preprocess(source, spec)
        assert prepared.aspect_ratio == tuple(expected["aspect_ratio"]), (case, spec.tile_size)
        assert prepared.pixel_values.shape == expected["pixel_values"].shape, (case, spec.tile_size)
        worst = float(np.abs(prepared.pixel_values - expected["pixel_values"]).max())
        assert worst <= PIXEL_TOLERANCE, f"{case} at tile {spec.tile_size}: max |diff| {worst}"


def test_cases_cover_the_issue():
    """>= 20 images, and the canvases they land on include one tile, several, and the 16-tile cap."""
    assert len(CASES) >= 20
    resolutions = im.supported_resolutions(16, 336)
    sizes = [(h, w) for h, w in ((336, 336), (200, 1000), (1500, 1700), (20, 30))]
    grids = {tuple(side // 336 for side in im.best_fit(h, w, resolutions)) for h, w in sizes}
    assert (1, 1) in grids and (4, 4) in grids and any(1 < r * c < 16 for r, c in grids)
    assert 1500 * 1700 > 16 * 336 * 336  # more pixels than 16 tiles hold: downscaled onto the cap


def test_file_path_equals_bytes(tmp_path):
    data = _jpeg_with_orientation(6, 30)
    path = tmp_path / "rotated.jpg"
    path.write_bytes(data)
    a, b = im.preprocess(path, im.ImageSpec()), im.preprocess(data, im.ImageSpec())
    assert a.aspect_ratio == b.aspect_ratio and np.array_equal(a.pixel_values, b.pixel_values)
    assert a.aspect_ratio == (2, 1)  # 400x240 rotated a quarter turn is tall: two tiles down


def test_expanded_ids_equal_processor(reference):
    """Llama4Processor's input_ids for text with <|image|> placeholders equal the runtime's expansion, for the
    published tile geometry (144 tokens per tile) and a tiny one (4 per tile), with one and several images."""
    from tokenizers import Tokenizer

    from tests.vision_fixtures import image_token_ids

    ids = image_token_ids(512)
    tokens = im.ImageTokens(
        image=ids["<|image|>"],
        image_start=ids["<|image_start|>"],
        image_end=ids["<|image_end|>"],
        patch=ids["<|patch|>"],
        tile_x_separator=ids["<|tile_x_separator|>"],
        tile_y_separator=ids["<|tile_y_separator|>"],
    )
    raw = Tokenizer.from_file(str(reference["tokenizer"]))
    for spec in (PUBLISHED, TINY):
        for text, chosen in TEXTS:
            expected = reference[(text, spec.tile_size)]
            prompt = raw.encode(text, add_special_tokens=False).ids
            prepared = [im.preprocess(CASES[n](), spec) for n in chosen]
            got = im.expand_placeholders(prompt, prepared, spec.tokens_per_tile, tokens)
            assert got == expected["input_ids"].tolist(), (text, spec.tile_size)
            if prepared:  # the processor's pixel values are the images' tiles in order
                stacked = np.concatenate([p.pixel_values for p in prepared])
                assert np.abs(stacked - expected["pixel_values"]).max() <= PIXEL_TOLERANCE
    assert PUBLISHED.tokens_per_tile == 144 and TINY.tokens_per_tile == 4
