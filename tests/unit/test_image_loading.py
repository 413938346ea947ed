"""Fetching and decoding image inputs: formats, orientation, limits, and every way an image can be bad."""

import asyncio
import base64
import io

import httpx
import numpy as np
import pytest
from mistral_common.tokens.tokenizers.image import _convert_to_rgb
from PIL import Image

from deployments.image_loading import (
    PAD_COLOR,
    ImageError,
    apply_aspect_policy,
    decode_data_url,
    decode_image,
    decode_upright,
    load_image_bytes,
)
from serve.config import AspectRatioPolicy, ImagesConfig
from tests.image_server import data_url, image_bytes

FULL_PNG = image_bytes((120, 90), color=(255, 0, 0), compress_level=0)
TRUNCATED_PNG = FULL_PNG[: len(FULL_PNG) // 2]
LOCAL = ImagesConfig(allow_private_networks=True, fetch_timeout_s=2.0, max_redirects=2)


def load(url: str, limits: ImagesConfig = LOCAL) -> Image.Image:
    async def run():
        async with httpx.AsyncClient(trust_env=False) as http:
            return decode_upright(await load_image_bytes(url, limits, http), limits)

    return asyncio.run(run())


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_supported_formats_decode_to_rgb_of_the_right_size(fmt):
    image = decode_image(image_bytes((70, 30), fmt=fmt), max_pixels=10**6)
    assert image.mode == "RGB"
    assert image.size == (70, 30)


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (20, 10), color) for color in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    image = decode_image(buffer.getvalue(), max_pixels=10**6)
    assert image.getpixel((5, 5))[0] > 200 and image.getpixel((5, 5))[2] < 50


def test_exif_orientation_is_applied():
    source = Image.new("RGB", (40, 20), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    buffer = io.BytesIO()
    source.save(buffer, "JPEG", exif=exif)
    assert decode_image(buffer.getvalue(), max_pixels=10**6).size == (20, 40)


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "LA"])
def test_modes_convert_to_rgb_exactly_as_mistral_common_does(mode):
    data = image_bytes((33, 17), mode=mode, color=(255, 0, 0))
    ours = decode_image(data, max_pixels=10**6)
    theirs = _convert_to_rgb(Image.open(io.BytesIO(data)))
    assert ours.mode == "RGB"
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    assert decode_image(buffer.getvalue(), max_pixels=100).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"<html>not an image</html>", "not an image"),
        (image_bytes(fmt="TIFF"), "format TIFF is not supported"),
        (image_bytes(fmt="BMP"), "format BMP is not supported"),
        (TRUNCATED_PNG, "corrupt"),
        (image_bytes((300, 200)), "300x200 pixels; the limit is 50000"),
    ],
)
def test_bad_image_data_is_refused_with_the_reason(data, message):
    with pytest.raises(ImageError, match=message):
        decode_image(data, max_pixels=50_000)


def test_pillow_decompression_bomb_guard_stays_on(monkeypatch):
    # Our own cap is the first line; Pillow's guard is the second.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="too large"):
        decode_image(image_bytes((100, 100)), max_pixels=10**6)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("data:image/png;base64,@@@@", "not valid base64"),
        ("data:text/plain;base64,aGVsbG8=", "not an image type"),
        ("data:image/png,rawbytes", "data:image/<format>;base64"),
        (data_url(b"\0" * 5000), "4096-byte limit"),
    ],
)
def test_bad_data_urls(url, message):
    with pytest.raises(ImageError, match=message):
        decode_data_url(url, max_bytes=4096)


def test_data_url_loads():
    image = load(data_url(image_bytes((12, 8), fmt="WEBP"), "image/webp"))
    assert image.size == (12, 8)


def test_http_url_loads_and_follows_redirects_within_the_limit(image_server):
    url = image_server.add("photo.jpg", image_bytes((50, 40), fmt="JPEG"), "image/jpeg")
    assert load(url).size == (50, 40)
    assert load(image_server.url("redirect/2/photo.jpg")).size == (50, 40)


@pytest.mark.parametrize(
    ("path", "limits", "message"),
    [
        ("redirect/3/photo.jpg", LOCAL, "more than 2 redirects"),
        ("status/404", LOCAL, "returned HTTP 404"),
        ("status/500", LOCAL, "returned HTTP 500"),
        ("slow/5", LOCAL.model_copy(update={"fetch_timeout_s": 0.5}), "longer than 0.5 s"),
        ("files/big.png", LOCAL.model_copy(update={"max_image_bytes": 2048}), "limit is 2048"),
        ("stream/300000", LOCAL.model_copy(update={"max_image_bytes": 100_000}), "100000-byte limit"),
        ("files/page.html", LOCAL, "not an image"),
        ("files/photo.jpg", ImagesConfig(), r"127\.0\.0\.1 is a loopback address"),
    ],
)
def test_fetch_failures_name_the_reason(image_server, path, limits, message):
    image_server.add("photo.jpg", image_bytes((50, 40), fmt="JPEG"), "image/jpeg")
    image_server.add("big.png", image_bytes((200, 200), fmt="PNG", compress_level=0))
    image_server.add("page.html", b"<html><body>hello</body></html>", "text/html")
    with pytest.raises(ImageError, match=message):
        load(image_server.url(path), limits)


def test_a_redirect_into_a_private_network_is_refused(image_server):
    # Every hop is checked, not just the URL the client sent.
    requests_before = len(image_server.requests)
    with pytest.raises(ImageError, match="is a loopback address"):
        load(image_server.url("redirect/1/photo.jpg"), ImagesConfig())
    assert len(image_server.requests) == requests_before


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://example.com/a.png", "gopher://x", "/relative.png"]
)
def test_other_url_schemes_are_refused(url):
    with pytest.raises(ImageError, match="http://, https:// or data:"):
        load(url)


def test_unresolvable_host_is_a_clear_error():
    with pytest.raises(ImageError, match="cannot resolve"):
        load("http://no-such-host.invalid/a.png", ImagesConfig())


@pytest.mark.parametrize(
    ("size", "mode", "expected"),
    [
        ((400, 100), "keep", (400, 100)),
        ((400, 100), "crop", (200, 100)),
        ((100, 400), "crop", (100, 200)),
        ((400, 100), "pad", (400, 200)),
        ((100, 400), "pad", (200, 400)),
        ((150, 100), "crop", (150, 100)),
        ((150, 100), "pad", (150, 100)),
    ],
)
def test_aspect_ratio_policy(size, mode, expected):
    image = Image.new("RGB", size, (255, 0, 0))
    shaped = apply_aspect_policy(image, AspectRatioPolicy(mode=mode, max_aspect_ratio=2.0))
    assert shaped.size == expected
    centre = (expected[0] // 2, expected[1] // 2)
    assert shaped.getpixel(centre) == (255, 0, 0)
    if mode == "pad" and expected != size:
        assert shaped.getpixel((0, 0)) == PAD_COLOR


def test_policy_applies_to_loaded_images():
    limits = LOCAL.model_copy(update={"aspect_ratio": AspectRatioPolicy(mode="crop", max_aspect_ratio=1.0)})
    assert load(data_url(image_bytes((90, 30))), limits).size == (30, 30)


def test_data_url_payload_is_checked_before_decoding():
    huge = "data:image/png;base64," + base64.b64encode(b"\0" * 10_000).decode()
    with pytest.raises(ImageError, match="larger than the 1024-byte limit"):
        decode_data_url(huge, max_bytes=1024)
