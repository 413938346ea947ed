"""Image inputs: fetch (http/https/data URLs) and decode them into RGB Pillow images.

Runs in the preprocess stage. Every failure a client can cause (unreachable
URL, a body over the byte cap, bytes that are not an image, an unsupported
format, a decompression bomb) is an `ImageError` whose message says what was
wrong; the preprocess stage turns it into a 400 naming the content part.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import warnings
from urllib.parse import urljoin

import httpx
from PIL import Image, ImageOps, UnidentifiedImageError

from deployments.url_guard import RefusedUrl, Resolver, checked_target, system_resolver
from serve.config import AspectRatioPolicy, ImagesConfig

# Formats decoded; anything else Pillow recognises is refused by name.
SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")

# mistral_common normalises with these channel means (DATASET_MEAN x 255):
# padding with them puts the padded area at zero after normalisation.
PAD_COLOR = (123, 117, 104)


class ImageError(ValueError):
    """An image input the service cannot use, described for the client."""


async def load_image_bytes(
    url: str,
    limits: ImagesConfig,
    http: httpx.AsyncClient,
    resolve: Resolver = system_resolver,
    fetch_slots: asyncio.Semaphore | None = None,
) -> bytes:
    """The encoded image behind `url`: a data URL's payload, or the body fetched from it.

    `fetch_slots` caps the URLs fetched at once (data URLs need no slot)."""
    if url.startswith("data:"):
        return decode_data_url(url, limits.max_image_bytes)
    if fetch_slots is None:
        return await fetch_url(url, limits, http, resolve)
    async with fetch_slots:
        return await fetch_url(url, limits, http, resolve)


def decode_upright(data: bytes, limits: ImagesConfig) -> Image.Image:
    """Decode an encoded image: RGB, upright, the aspect-ratio policy applied. CPU work."""
    return apply_aspect_policy(decode_image(data, limits.max_image_pixels), limits.aspect_ratio)


def decode_data_url(url: str, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ImageError("a data URL must look like data:image/<format>;base64,<data>")
    media_type = header[len("data:") : -len(";base64")]
    if not media_type.startswith("image/"):
        raise ImageError(f"data URL media type {media_type!r} is not an image type")
    # Base64 is 4 characters per 3 bytes: refuse oversized payloads before decoding them.
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise ImageError(f"image is larger than the {max_bytes}-byte limit")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError("data URL payload is not valid base64") from e
    if len(data) > max_bytes:
        raise ImageError(f"image is {len(data)} bytes; the limit is {max_bytes}")
    return data


async def fetch_url(
    url: str, limits: ImagesConfig, http: httpx.AsyncClient, resolve: Resolver = system_resolver
) -> bytes:
    """GET `url` with the configured time, size and redirect limits, each hop checked by the URL guard."""
    try:
        async with asyncio.timeout(limits.fetch_timeout_s):
            return await _get(url, limits, http, resolve)
    except RefusedUrl as e:
        raise ImageError(f"{_short(url)}: {e}") from e
    except TimeoutError as e:
        raise ImageError(f"fetching {_short(url)} took longer than {limits.fetch_timeout_s} s") from e
    except httpx.HTTPError as e:
        raise ImageError(f"could not fetch {_short(url)}: {type(e).__name__}: {e}") from e


async def _get(url: str, limits: ImagesConfig, http: httpx.AsyncClient, resolve: Resolver) -> bytes:
    for _hop in range(limits.max_redirects + 1):
        target = await checked_target(url, limits, resolve)
        extensions = {"sni_hostname": target.sni_hostname} if target.sni_hostname else {}
        request = http.build_request(
            "GET", target.url, headers={"Host": target.host_header}, extensions=extensions
        )
        response = await http.send(request, stream=True, follow_redirects=False)
        try:
            if response.is_redirect and "location" in response.headers:
                # Resolved against the URL as the client wrote it, and checked again:
                # a public URL may redirect inward.
                url = urljoin(url, response.headers["location"])
                continue
            return await _body(response, url, limits.max_image_bytes)
        finally:
            await response.aclose()
    raise ImageError(f"fetching {_short(url)} followed more than {limits.max_redirects} redirects")


async def _body(response: httpx.Response, url: str, max_bytes: int) -> bytes:
    if response.status_code != 200:
        raise ImageError(f"fetching {_short(url)} returned HTTP {response.status_code}")
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise ImageError(f"image is {declared} bytes; the limit is {max_bytes}")
    body = bytearray()
    async for piece in response.aiter_bytes():
        body.extend(piece)
        if len(body) > max_bytes:
            raise ImageError(f"image is larger than the {max_bytes}-byte limit")
    return bytes(body)


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode image bytes into an upright RGB image, within the pixel limit."""
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        raise ImageError("the data is not an image in a format this service reads") from e
    except Image.DecompressionBombError as e:
        raise ImageError(f"image is too large to decode: {e}") from e
    if image.format not in SUPPORTED_FORMATS:
        raise ImageError(f"image format {image.format} is not supported; send {', '.join(SUPPORTED_FORMATS)}")
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(f"image is {width}x{height} pixels; the limit is {max_pixels} pixels")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()  # the first frame of an animated GIF or WebP
            image = ImageOps.exif_transpose(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image is too large to decode: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"image data is corrupt: {e}") from e
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, transparent areas white: the same operations as mistral_common's own
    conversion (a private function there), so that the pixels are identical."""
    if image.mode == "RGB":
        return image
    if image.mode != "RGBA":
        image = image.convert("RGBA")
    background = Image.new("RGBA", image.size, "WHITE")
    background.paste(image, (0, 0), image)
    return background.convert("RGB")


def apply_aspect_policy(image: Image.Image, policy: AspectRatioPolicy) -> Image.Image:
    """Crop or pad an image whose long/short side ratio exceeds the policy's, down to that ratio."""
    width, height = image.size
    if policy.mode == "keep" or max(width, height) <= policy.max_aspect_ratio * min(width, height):
        return image
    wide = width > height
    long_side, short_side = (width, height) if wide else (height, width)
    if policy.mode == "crop":
        new_long = max(1, round(short_side * policy.max_aspect_ratio))
        offset = (long_side - new_long) // 2
        box = (offset, 0, offset + new_long, height) if wide else (0, offset, width, offset + new_long)
        return image.crop(box)
    new_short = max(1, round(long_side / policy.max_aspect_ratio))
    size = (width, new_short) if wide else (new_short, height)
    padded = Image.new("RGB", size, PAD_COLOR)
    offset = (new_short - short_side) // 2
    padded.paste(image, (0, offset) if wide else (offset, 0))
    return padded


def _short(url: str, limit: int = 80) -> str:
    return url if len(url) <= limit else url[: limit - 3] + "..."
