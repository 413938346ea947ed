"""Fetching and decoding image inputs: formats, orientation, limits, and every way an image can be bad."""

import asyncio
import base64
import io
import struct
import tracemalloc
import zlib

import httpx
import numpy as np
import pytest
from mistral_common.tokens.tokenizers.image import _convert_to_rgb
from PIL import BmpImagePlugin, Image, ImageFile, TiffImagePlugin

from deployments.image_loading import (
    PAD_COLOR,
    ImageError,
    apply_aspect_policy,
    decode_data_url,
    decode_upright,
    load_image_bytes,
)
from serve.config import AspectRatioPolicy, ImagesConfig
from tests.image_server import data_url, image_bytes

FULL_PNG = image_bytes((120, 90), color=(255, 0, 0), compress_level=0)
TRUNCATED_PNG = FULL_PNG[: len(FULL_PNG) // 2]
# The test image server listens on 127.0.0.1, on a port of its own.
LOCAL = ImagesConfig(allow_private_networks=True, allowed_ports=[], fetch_timeout_s=2.0, max_redirects=2)
# Ministral 3's tokenizer resizes images to at most this many pixels a side (its max_image_size).
MODEL_MAX_SIDE = 1540


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    return decode_upright(data, ImagesConfig(max_image_pixels=max_pixels))


def jpeg(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, "JPEG")
    return buffer.getvalue()


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
        (TRUNCATED_PNG, "corrupt"),
        (image_bytes((300, 200)), "300x200 pixels; the limit is 50000"),
    ],
)
def test_bad_image_data_is_refused_with_the_reason(data, message):
    with pytest.raises(ImageError, match=message):
        decode_image(data, max_pixels=50_000)


@pytest.mark.parametrize(
    ("fmt", "image_file_class"),
    [("TIFF", TiffImagePlugin.TiffImageFile), ("BMP", BmpImagePlugin.BmpImageFile)],
)
def test_other_formats_are_refused_unparsed_naming_the_supported_ones(monkeypatch, fmt, image_file_class):
    def parse(self):
        pytest.fail(f"the {fmt} parser read a client's bytes")

    monkeypatch.setattr(image_file_class, "_open", parse)
    with pytest.raises(
        ImageError, match=r"not an image in a format this service reads \(PNG, JPEG, WEBP, GIF\)"
    ):
        decode_image(image_bytes(fmt=fmt), max_pixels=10**6)


def test_a_small_png_that_decodes_large_is_refused_before_its_pixels_are_decoded(monkeypatch):
    buffer = io.BytesIO()
    Image.new("1", (6300, 6300), 1).save(buffer, "PNG")
    assert len(buffer.getvalue()) < 20_000  # 40 MP, 160 MiB as RGBA

    def load(self):
        pytest.fail("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    with pytest.raises(ImageError, match="6300x6300 pixels; the limit is 16777216 pixels"):
        decode_upright(buffer.getvalue(), ImagesConfig())


@pytest.mark.parametrize(
    ("size", "policy", "decoded"),
    [
        # Decoded at 1/2: 1/4 would leave the long side under the model's 1540 px.
        ((6000, 4000), AspectRatioPolicy(), (3000, 2000)),
        ((4000, 6000), AspectRatioPolicy(), (2000, 3000)),
        # Cropped to 2000 x 1000 afterwards: even 1/2 would leave it under 1540 px.
        ((6000, 1000), AspectRatioPolicy(mode="crop", max_aspect_ratio=2.0), (2000, 1000)),
        ((1000, 800), AspectRatioPolicy(), (1000, 800)),
    ],
)
def test_a_large_jpeg_is_decoded_at_the_smallest_scale_the_model_still_sees_in_full(size, policy, decoded):
    # 24 MP is over the default pixel limit; the limit applies to what is decoded.
    image = decode_upright(jpeg(size), ImagesConfig(aspect_ratio=policy), MODEL_MAX_SIDE)
    assert image.size == decoded
    assert MODEL_MAX_SIDE <= max(image.size) < 2 * MODEL_MAX_SIDE or image.size == size


def test_a_jpeg_decoded_in_full_is_the_same_with_or_without_the_model_size():
    data = image_bytes((300, 200), fmt="JPEG")
    assert np.array_equal(
        np.asarray(decode_image(data, 10**6)),
        np.asarray(decode_upright(data, ImagesConfig(), MODEL_MAX_SIDE)),
    )


def png_header(width: int, height: int) -> bytes:
    """A PNG's signature, header and end, with no pixel data: what Pillow reads to size an image."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_pillow_decompression_bomb_guard_stays_on():
    """Our own cap is the first line, Pillow's guard the second, as it stands once everything the
    preprocess replica imports is imported: a header of 400 megapixels is refused as a bomb when
    opened (with the guard off at import, it would open, and fail later as corrupt)."""
    import deployments.preprocess  # noqa: F401

    with pytest.raises(ImageError, match="too large to decode"):
        decode_image(png_header(20_000, 20_000), max_pixels=10**10)


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
        ("slow/5", LOCAL.model_copy(update={"fetch_timeout_s": 0.5}), "longer than 0.5 s"),
        ("files/big.png", LOCAL.model_copy(update={"max_image_bytes": 2048}), "limit is 2048"),
        ("stream/300000", LOCAL.model_copy(update={"max_image_bytes": 100_000}), "100000-byte limit"),
        ("files/page.html", LOCAL, "not an image"),
        ("files/photo.jpg", ImagesConfig(allowed_ports=[]), r"127\.0\.0\.1 is a loopback address"),
        (
            "files/photo.jpg",
            ImagesConfig(allow_private_networks=True),
            r"port \d+ is not one this service fetches images from \(images\.allowed_ports\)",
        ),
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
        load(image_server.url("redirect/1/photo.jpg"), ImagesConfig(allowed_ports=[]))
    assert len(image_server.requests) == requests_before


def test_a_compressed_body_is_refused_before_it_is_decompressed(image_server):
    # 64 MiB of zeros gzipped twice: a few hundred bytes on the wire.
    tracemalloc.start()
    try:
        with pytest.raises(ImageError, match="Content-Encoding: gzip, gzip"):
            load(image_server.url(f"gzip/2/{64 * 2**20}"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://example.com/a.png", "gopher://x", "/relative.png"]
)
def test_other_url_schemes_are_refused(url):
    with pytest.raises(ImageError, match="http://, https:// or data:"):
        load(url)


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
