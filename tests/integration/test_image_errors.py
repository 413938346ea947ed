"""Every bad image input is a 400 naming the content part and the reason; the service keeps answering."""

import io

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.image_server import data_url, image_bytes
from tests.integration.test_errors import USER, assert_openai_error, post
from tests.ports import free_port

PART = "messages[0].content[0].image_url"


def noise_png(width: int, height: int) -> bytes:
    """Incompressible: a PNG about width x height x 3 bytes long."""
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=0)
    return buffer.getvalue()


def with_images(*urls: str, text: str = "What is this?") -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def cases(image_server):
    image_server.add("page.html", b"<html><body>not a picture</body></html>", "text/html")
    image_server.add("photo.png", image_bytes((40, 30)))
    full = image_bytes((120, 90), color=(255, 0, 0), compress_level=0)
    tiny = data_url(image_bytes((8, 8)))
    big_square = data_url(image_bytes((1600, 1600)))
    return {
        "unreachable": (with_images(f"http://127.0.0.1:{free_port()}/a.png"), PART, "could not fetch"),
        # An HTTP status, like a connection error, is for the service's log only.
        "http-404": (with_images(image_server.url("status/404")), PART, "could not fetch"),
        "too-many-redirects": (
            with_images(image_server.url("redirect/3/photo.png")),
            PART,
            "more than 2 redirects",
        ),
        "not-an-image": (with_images(image_server.url("files/page.html")), PART, "not an image"),
        "corrupt": (with_images(data_url(full[: len(full) // 2])), PART, "corrupt"),
        "unsupported-format": (
            with_images(data_url(image_bytes(fmt="TIFF"), "image/tiff")),
            PART,
            "not an image in a format this service reads (PNG, JPEG, WEBP, GIF)",
        ),
        "over-the-byte-limit": (with_images(data_url(noise_png(700, 600))), PART, "1000000"),
        "over-the-pixel-limit": (
            with_images(data_url(image_bytes((4200, 4100)))),
            PART,
            "4200x4100 pixels; the limit is 16777216",
        ),
        "bad-base64": (with_images("data:image/png;base64,%%%"), PART, "not valid base64"),
        "file-url": (with_images("file:///etc/hostname"), PART, "http://, https:// or data:"),
        "more-images-than-allowed": (with_images(*[tiny] * 7), "messages", "at most 6"),
        "image-tokens-over-the-context": (
            with_images(big_square, big_square),
            "messages",
            "maximum context length",
        ),
        "image-in-an-assistant-message": (
            [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": tiny}}]},
                {"role": "user", "content": "Well?"},
            ],
            "messages[1].content",
            "user messages only",
        ),
    }


CASE_NAMES = [
    "unreachable",
    "http-404",
    "too-many-redirects",
    "not-an-image",
    "corrupt",
    "unsupported-format",
    "over-the-byte-limit",
    "over-the-pixel-limit",
    "bad-base64",
    "file-url",
    "more-images-than-allowed",
    "image-tokens-over-the-context",
    "image-in-an-assistant-message",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_image_is_a_400_then_the_service_still_answers(client, service, image_server, name):
    messages, param, text = cases(image_server)[name]
    response = post(service, {"model": service.model, "messages": messages, "max_tokens": 4})
    assert_openai_error(response, 400, param, text)
    healthy = client.chat.completions.create(
        model=service.model, messages=with_images(data_url(image_bytes((30, 30)))), max_tokens=2
    )
    assert healthy.usage.completion_tokens == 2
    assert (
        client.chat.completions.create(
            model=service.model, messages=USER, max_tokens=2
        ).usage.completion_tokens
        == 2
    )


def test_every_case_is_covered(image_server):
    assert sorted(cases(image_server)) == sorted(CASE_NAMES)


def test_context_overflow_says_it_is_the_images(service):
    big = data_url(image_bytes((1600, 1600)))
    response = post(service, {"model": service.model, "messages": with_images(big, big), "max_tokens": 4})
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert httpx.get(f"{service.base_url}/health", timeout=30).status_code == 200
