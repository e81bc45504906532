"""Images over HTTP (issue 23, item 3): OpenAI's own client sends image_url parts (data: URLs, files under
--allowed-local-media-path) to a tiny-vision bundle's server, whose answers equal Engine.generate on the same
expanded prompt and images; remote URLs and images sent to a text-only bundle are 400s that say why.

Servers listen on 127.0.0.1 with an ephemeral port; every request is bounded in time.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed")
openai = pytest.importorskip("openai", reason="the test extra (openai client) is not installed")

from llama4_deploy.runtime import images as im  # noqa: E402
from tests.test_serve import Live  # noqa: E402
from tests.test_vision import _picture  # noqa: E402


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    directory = tmp_path_factory.mktemp("media")
    (directory / "b.png").write_bytes(_png(_picture(56, 112, 32)))
    return directory


@pytest.fixture(scope="module")
def live(vision_engine, media):
    with Live(vision_engine, max_queue=8, allowed_local_media_path=media) as live:
        yield live


def test_chat_with_images_equals_generate(live, vision_engine, media):
    """Two image parts (a data: URL and a local file) in one user message: the answer is what generate gives for
    the server's own prompt ids and the same images; the usage counts the image tokens."""
    first = _png(_picture(120, 100, 31))
    content = [
        {"type": "text", "text": "w3 w4"},
        {"type": "image_url", "image_url": {"url": _data_url(first)}},
        {"type": "text", "text": "w5"},
        {"type": "image_url", "image_url": {"url": f"file://{media}/b.png"}},
    ]
    client = live.client()
    answer = client.chat.completions.create(
        model=live.server.model, messages=[{"role": "user", "content": content}], max_tokens=5, temperature=0
    )
    server = live.server
    ids = prompt_without_expansion(server, vision_engine)
    images = [[first, (media / "b.png").read_bytes()]]
    expanded = vision_engine.prepare_images([ids], images, 5)[0][0]
    direct = vision_engine.generate([ids], 5, images=images, stop_tokens=server.engine.manifest.eos_token_ids)
    assert answer.usage.prompt_tokens == len(expanded)
    assert answer.choices[0].message.content == server.tokenizer.decode(direct.tokens[0])


def prompt_without_expansion(server, engine) -> list[int]:
    """The chat's ids with one <|image|> id where each image part stands (the template's text encoded as text)."""
    text = server.chat_template.render([{"role": "user", "content": "w3 w4\ue000image\ue000w5\ue000image\ue000"}])
    ids: list[int] = []
    for k, piece in enumerate(text.split("\ue000image\ue000")):
        ids += server.tokenizer.encode(piece, add_special_tokens=False) if piece else []
        if k < 2:
            ids.append(engine.image_tokens.image)
    return ids


@pytest.mark.parametrize(
    "url, words",
    [
        ("https://example.com/cat.png", "is a remote URL (https); this server does not fetch URLs"),
        ("file:///etc/passwd", "which is not a file under --allowed-local-media-path"),
        ("data:image/png;base64,@@", "payload is not valid base64"),
        (_data_url(b"not a png"), "cannot be decoded as an image"),
    ],
    ids=["remote", "outside", "base64", "corrupt"],
)
def test_bad_image_urls_are_400(live, url, words):
    body = {
        "model": live.server.model,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
        "max_tokens": 2,
    }
    status, _, payload = live.post("/v1/chat/completions", body)
    assert status == 400 and words in payload["error"]["message"], payload


def test_image_to_a_text_only_bundle_is_400(tiny_bundle):
    from llama4_deploy.runtime import load

    with load(tiny_bundle) as engine, Live(engine) as live:
        body = {
            "model": live.server.model,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(b"x")}}]}],
        }
        status, _, payload = live.post("/v1/chat/completions", body)
    assert status == 400
    assert "has no vision engine (built from a text-only checkpoint or with --no-vision)" in payload["error"]["message"]


def test_image_tokens_count_against_the_context(live):
    """Images count against the context like their tokens do: four 2x2 images (27 tokens each) and 20 new tokens
    in a 128-token context are refused before anything runs."""
    picture = _data_url(_png(_picture(150, 150, 40)))
    content = [{"type": "image_url", "image_url": {"url": picture}} for _ in range(5)]
    body = {"model": live.server.model, "messages": [{"role": "user", "content": content}], "max_tokens": 20}
    status, _, payload = live.post("/v1/chat/completions", body)
    assert status == 400 and "exceeds the bundle's context of 128 tokens" in payload["error"]["message"], payload
    assert im.ImageSpec(tile_size=56, max_patches=4).tokens_per_tile == 4


@pytest.mark.parametrize(
    "part, words",
    [
        ({"type": "text", "image_url": {"url": "data:,"}}, "a text part holds text and no image_url"),
        ({"type": "image_url", "text": "w1"}, "an image_url part holds image_url and no text"),
        ({"type": "image_url", "image_url": {"url": "data:,", "detail": "high"}}, "detail"),
        ({"type": "input_audio", "input_audio": {}}, "input_audio"),
    ],
    ids=["text-with-image", "image-without-url", "detail-high", "audio"],
)
def test_malformed_parts_are_400(live, part, words):
    body = {"model": live.server.model, "messages": [{"role": "user", "content": [part]}], "max_tokens": 2}
    status, _, payload = live.post("/v1/chat/completions", body)
    assert status == 400 and words in payload["error"]["message"] + str(payload["error"]["param"]), payload
