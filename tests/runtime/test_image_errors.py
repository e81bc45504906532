"""Bad images (issue 23, item 6): each refused by runtime/images.py in one sentence (ImageError, a ValueError),
nothing written anywhere; an animation gives its first frame, said in the log."""

from __future__ import annotations

import io
import logging
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from llama4_deploy.runtime import images as im

SPEC = im.ImageSpec(tile_size=56, max_patches=4)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A valid small PNG whose header claims another size (the CRC fixed): what a decompression bomb looks like to
    the decoder before it inflates anything."""
    data = bytearray(_png(Image.new("RGB", (4, 4))))
    start = data.index(b"IHDR")
    data[start + 4 : start + 12] = struct.pack(">II", width, height)
    data[start + 17 : start + 21] = struct.pack(">I", zlib.crc32(bytes(data[start : start + 17])))
    return bytes(data)


def _one_sentence(message: str) -> None:
    assert "\n" not in message and "Traceback" not in message and message


@pytest.mark.parametrize(
    "source, words",
    [
        (_png(Image.new("RGB", (30, 30)))[:60], "cannot be decoded as an image (truncated or corrupt)"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "cannot be decoded as an image"),
        (b"not an image at all", "cannot be decoded as an image"),
        (b"", "is empty (0 bytes)"),
        (_png_claiming(9000, 9000), "has 9000x9000 = 81000000 pixels, more than the limit of 64000000"),
        (_png_claiming(40000, 40000), "declares more pixels than the limit of 64000000 (a decompression bomb"),
        (np.zeros((0, 5, 3), dtype=np.uint8), "has shape (0, 5, 3): an image with no pixels"),
        (np.zeros((5, 5, 3), dtype=np.uint16), "is a uint16 array; give uint8"),
        (np.zeros((5, 5, 2), dtype=np.uint8), "has shape (5, 5, 2); give HW or HWC with 3 or 4 channels"),
        (Image.new("I;16", (8, 8)), "has 'I;16' pixels (16- or 32-bit); give 8 bits per channel"),
        (12345, "is a int; give a PIL image, an HWC uint8 array, a path or bytes"),
    ],
    ids=[
        "truncated",
        "corrupt-header",
        "garbage",
        "empty",
        "bomb",
        "pillow-bomb",
        "zero-sized",
        "uint16-array",
        "two-channels",
        "16-bit",
        "wrong-type",
    ],
)
def test_bad_image_is_one_sentence(source, words):
    with pytest.raises(im.ImageError) as info:
        im.preprocess(source, SPEC, "prompt 0 image 1")
    message = str(info.value)
    _one_sentence(message)
    assert message.startswith("prompt 0 image 1") and words in message


def test_sixteen_bit_png_file_is_refused(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((6, 6), 40000, dtype=np.uint16)).save(path)
    before = sorted(tmp_path.iterdir())
    with pytest.raises(im.ImageError, match=r"16- or 32-bit\); give 8 bits per channel"):
        im.preprocess(path, SPEC)
    assert sorted(tmp_path.iterdir()) == before  # nothing written beside it


def test_missing_file_is_named(tmp_path):
    with pytest.raises(im.ImageError, match=r"^image '.*nope.png' is not a file$"):
        im.preprocess(tmp_path / "nope.png", SPEC)


def test_animation_takes_its_first_frame_and_says_so(caplog):
    frames = [Image.new("RGB", (20, 20), color) for color in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    with caplog.at_level(logging.WARNING, logger="llama4_deploy.runtime.images"):
        animated = im.preprocess(buffer.getvalue(), SPEC, "prompt 0 image 0")
    assert "prompt 0 image 0 is animated (2 frames); its first frame is taken" in caplog.text
    still = im.preprocess(_gif(frames[0]), SPEC)
    assert np.array_equal(animated.pixel_values, still.pixel_values)


def _gif(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="GIF")
    return buffer.getvalue()


def test_placeholders_and_images_must_agree():
    tokens = im.ImageTokens(image=9, image_start=10, image_end=11, patch=12, tile_x_separator=13, tile_y_separator=14)
    one = im.preprocess(np.zeros((20, 20, 3), np.uint8), SPEC)
    with pytest.raises(im.ImageError, match=r"^prompt 2 has 2 <\|image\|> placeholders but 1 image was given; give "):
        im.expand_placeholders([1, 9, 2, 9], [one], SPEC.tokens_per_tile, tokens, "prompt 2")
    with pytest.raises(im.ImageError, match=r"^prompt 0 has 0 <\|image\|> placeholders but 2 images were given"):
        im.expand_placeholders([1, 2], [one, one], SPEC.tokens_per_tile, tokens, "prompt 0")


def test_image_urls(tmp_path):
    """OpenAI image_url values: data: URLs decode; files only under the allowed directory; remote URLs refused."""
    import base64

    png = _png(Image.new("RGB", (5, 5), (1, 2, 3)))
    assert im.image_from_url("data:image/png;base64," + base64.b64encode(png).decode()) == png
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "a.png").write_bytes(png)
    (tmp_path / "secret.png").write_bytes(png)
    allowed = tmp_path / "media"
    assert im.image_from_url(f"file://{allowed}/a.png", allowed) == png
    assert im.image_from_url(str(allowed / "a.png"), allowed) == png
    refusals = [
        ("https://example.com/cat.png", allowed, "is a remote URL (https); this server does not fetch URLs"),
        (f"file://{tmp_path}/secret.png", allowed, "which is not a file under --allowed-local-media-path"),
        (f"file://{allowed}/../secret.png", allowed, "which is not a file under --allowed-local-media-path"),
        (f"file://{allowed}/a.png", None, "reads only under --allowed-local-media-path"),
        (f"file://{allowed}/missing.png", allowed, "which does not exist"),
        ("data:image/png;base64,@@@", None, "payload is not valid base64"),
        ("data:text/plain;base64,aGk=", None, "is a data: URL of 'text/plain', not an image"),
        ("data:image/png,rawbytes", None, "without ';base64,'"),
        ("gopher://x", None, "has the scheme 'gopher'"),
    ]
    for url, root, words in refusals:
        with pytest.raises(im.ImageError) as info:
            im.image_from_url(url, root, "messages[0].content[1].image_url")
        assert words in str(info.value) and str(info.value).startswith("messages[0].content[1].image_url")
