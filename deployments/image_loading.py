"""Image inputs: fetch (http/https/data URLs) and decode them into RGB Pillow images.

Runs in the preprocess stage. Every failure a client can cause (unreachable
URL, a body over the byte cap, bytes that are not an image, an unsupported
format, a decompression bomb) is an `ImageError` whose message says what was
wrong; the preprocess stage turns it into a 400 naming the content part. What
only the network knows (what a name resolved to, a connection error, an HTTP
status) goes to the log instead: told to clients, it would map the networks
the service reaches.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import logging
import math
import warnings
from urllib.parse import urljoin

import httpx
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL.JpegImagePlugin import JpegImageFile

from deployments.url_guard import RefusedUrl, Resolver, UnfetchableHost, checked_target, system_resolver
from serve.config import AspectRatioPolicy, ImagesConfig

logger = logging.getLogger(__name__)

# The formats decoded. Only their parsers see a client's bytes: Pillow would otherwise try
# every format it knows on them.
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
    return await fetch_url(url, limits, http, resolve, fetch_slots)


def decode_upright(data: bytes, limits: ImagesConfig, model_max_side: int | None = None) -> Image.Image:
    """Decode an encoded image: RGB, upright, within the pixel limit, the aspect-ratio policy
    applied. CPU work.

    `model_max_side` is the longest side (px) the model resizes images down to (its tokenizer's
    max_image_size): a JPEG larger than that is decoded at a reduced scale that still keeps it."""
    image = _open(data)
    if model_max_side is not None and isinstance(image, JpegImageFile):
        # Pillow decodes a JPEG at 1/2, 1/4 or 1/8 scale for about that share of the memory and time.
        image.draft("RGB", jpeg_draft_size(image.size, model_max_side, limits.aspect_ratio))
    return apply_aspect_policy(_load_rgb(image, limits.max_image_pixels), limits.aspect_ratio)


def jpeg_draft_size(size: tuple[int, int], model_max_side: int, policy: AspectRatioPolicy) -> tuple[int, int]:
    """The least size to decode a JPEG of `size` at: its long side after the aspect-ratio policy
    stays at least `model_max_side`. Pillow's draft mode picks the smallest scale (1, 1/2, 1/4,
    1/8) that keeps both sides at least this."""
    excess = max(aspect_policy_size(size, policy)) / model_max_side
    if excess <= 1:
        return size
    width, height = size
    return math.ceil(width / excess), math.ceil(height / excess)


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
    url: str,
    limits: ImagesConfig,
    http: httpx.AsyncClient,
    resolve: Resolver = system_resolver,
    fetch_slots: asyncio.Semaphore | None = None,
) -> bytes:
    """GET `url` with the configured time, size and redirect limits, each hop checked by the URL guard.

    The wait for one of `fetch_slots` counts in the time limit."""
    try:
        async with asyncio.timeout(limits.fetch_timeout_s), fetch_slots or contextlib.nullcontext():
            return await _get(url, limits, http, resolve)
    except UnfetchableHost as e:
        raise _unfetchable(url, str(e)) from e
    except RefusedUrl as e:
        raise ImageError(f"{_short(url)}: {e}") from e
    except TimeoutError as e:
        raise ImageError(f"fetching {_short(url)} took longer than {limits.fetch_timeout_s} s") from e
    except httpx.HTTPError as e:
        raise _unfetchable(url, f"{type(e).__name__}: {e}") from e


def _unfetchable(url: str, reason: str) -> ImageError:
    """The client's error for a fetch that failed for a reason only the network knows; the reason
    goes to the log."""
    logger.info("image URL %s could not be fetched: %s", _short(url), reason)
    return ImageError(f"could not fetch {_short(url)} (the service's log says why)")


async def _get(url: str, limits: ImagesConfig, http: httpx.AsyncClient, resolve: Resolver) -> bytes:
    for _hop in range(limits.max_redirects + 1):
        target = await checked_target(url, limits, resolve)
        extensions = {"sni_hostname": target.sni_hostname} if target.sni_hostname else {}
        # Images are compressed already: a compressed transfer would gain little, and each layer
        # of Content-Encoding (gzip, gzip, ...) multiplies what a few bytes decode to.
        headers = {"Host": target.host_header, "Accept-Encoding": "identity"}
        request = http.build_request("GET", target.url, headers=headers, extensions=extensions)
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
        raise _unfetchable(url, f"HTTP {response.status_code}")
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise ImageError(
            f"the server of {_short(url)} sent the image with Content-Encoding: {encoding}; "
            "this service fetches images uncompressed only (they are compressed already)"
        )
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise ImageError(f"image is {declared} bytes; the limit is {max_bytes}")
    body = bytearray()
    async for piece in response.aiter_raw():
        body.extend(piece)
        if len(body) > max_bytes:
            raise ImageError(f"image is larger than the {max_bytes}-byte limit")
    return bytes(body)


def _open(data: bytes) -> Image.Image:
    """The image in `data`, its header read, no pixels decoded yet."""
    try:
        return Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError as e:
        raise ImageError(
            f"the data is not an image in a format this service reads ({', '.join(SUPPORTED_FORMATS)})"
        ) from e
    except Image.DecompressionBombError as e:
        raise ImageError(f"image is too large to decode: {e}") from e


def _load_rgb(image: Image.Image, max_pixels: int) -> Image.Image:
    """Decode an opened image's pixels into an upright RGB image, if its size is within `max_pixels`."""
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(f"image decodes to {width}x{height} pixels; the limit is {max_pixels} pixels")
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


def aspect_policy_size(size: tuple[int, int], policy: AspectRatioPolicy) -> tuple[int, int]:
    """The size `apply_aspect_policy` gives an image of `size`."""
    width, height = size
    if policy.mode == "keep" or max(size) <= policy.max_aspect_ratio * min(size):
        return size
    wide = width > height
    if policy.mode == "crop":
        new_long = max(1, round(min(size) * policy.max_aspect_ratio))
        return (new_long, height) if wide else (width, new_long)
    new_short = max(1, round(max(size) / policy.max_aspect_ratio))
    return (width, new_short) if wide else (new_short, height)


def apply_aspect_policy(image: Image.Image, policy: AspectRatioPolicy) -> Image.Image:
    """Crop or pad an image whose long/short side ratio exceeds the policy's, down to that ratio
    (centred)."""
    size = aspect_policy_size(image.size, policy)
    if size == image.size:
        return image
    (width, height), (new_width, new_height) = image.size, size
    if policy.mode == "crop":
        left, top = (width - new_width) // 2, (height - new_height) // 2
        return image.crop((left, top, left + new_width, top + new_height))
    padded = Image.new("RGB", size, PAD_COLOR)
    padded.paste(image, ((new_width - width) // 2, (new_height - height) // 2))
    return padded


def _short(url: str, limit: int = 80) -> str:
    return url if len(url) <= limit else url[: limit - 3] + "..."
