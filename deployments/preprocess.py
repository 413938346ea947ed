"""Preprocess stage: conversations with images -> prompt tokens + pixel arrays for the encoder.

Text-only conversations are templated inside the ingress process
(`serve.chat_template`): a separate deployment would add a network hop
and a serialisation to every request for microseconds of work. Conversations
with images come here: `ImageLoader` fetches and decodes the images, the chat
template (mistral_common) lays out the image tokens and normalises the
pixels, and the pixel arrays are left in Ray's object store for the encoder.
"""

from __future__ import annotations

import asyncio
import hashlib
import time

import httpx
import numpy as np
from PIL import Image
from ray import serve

from deployments.image_loading import ImageError, load_image
from deployments.url_guard import Resolver, system_resolver
from serve.chat_template import ChatTemplate, PartPosition, image_positions
from serve.checkpoint import open_checkpoint
from serve.config import AppConfig, ImagesConfig
from serve.errors import BadRequest
from serve.messages import ImageForEncoder, PreprocessedRequest
from serve.metrics import (
    IMAGES_PREPROCESSED,
    PREPROCESS_SECONDS,
    ray_metric,
)
from serve.protocol.chat import ChatMessage, ToolDefinition


def content_hash(pixels: np.ndarray) -> str:
    """Key of an image in the encoder's cache: the exact array the encoder would see."""
    digest = hashlib.blake2b(np.ascontiguousarray(pixels).data, digest_size=16)
    digest.update(repr(pixels.shape).encode())
    return digest.hexdigest()


class ImageLoader:
    """Fetches and decodes the images of a conversation, all at once."""

    def __init__(self, limits: ImagesConfig, resolve: Resolver = system_resolver):
        self.limits = limits
        self._resolve = resolve
        # No kept-alive connections: each fetch connects to the address its URL was checked for.
        self._http = httpx.AsyncClient(
            timeout=limits.fetch_timeout_s, trust_env=False, limits=httpx.Limits(max_keepalive_connections=0)
        )
        self._fetches = asyncio.Semaphore(limits.max_concurrent_fetches)

    async def load(self, messages: list[ChatMessage]) -> dict[PartPosition, Image.Image]:
        positions = image_positions(messages)
        loaded = await asyncio.gather(*(self._load_one(messages, position) for position in positions))
        return dict(zip(positions, loaded, strict=True))

    async def _load_one(self, messages: list[ChatMessage], position: PartPosition) -> Image.Image:
        i, j = position
        part = messages[i].content[j]
        try:
            image = await load_image(
                part.image_url.url, self.limits, self._http, self._resolve, self._fetches
            )
        except ImageError as e:
            param = f"messages[{i}].content[{j}].image_url"
            raise BadRequest(f"{param}: {e}", param=param, code="invalid_image") from e
        return image


class PreprocessMetrics:
    """The preprocess stage's metrics (serve/metrics.py catalogues them)."""

    def __init__(self):
        self.images_preprocessed = ray_metric(IMAGES_PREPROCESSED)
        self.seconds = ray_metric(PREPROCESS_SECONDS)


@serve.deployment(name="Preprocess")
class Preprocess:
    """Image requests: fetch, decode, template; pixel arrays go to the object store."""

    def __init__(self, config: AppConfig):
        self._template = ChatTemplate.from_config(open_checkpoint(config.model, weights=False), config)
        self._loader = ImageLoader(config.images)
        self._metrics = PreprocessMetrics()

    async def check_health(self) -> None:
        """Serve's periodic check, and the ingress's /health probe: answering is the check."""

    async def preprocess(
        self, messages: list[ChatMessage], tools: list[ToolDefinition] | None = None
    ) -> PreprocessedRequest:
        started = time.perf_counter()
        images = await self._loader.load(messages)
        # Resizing, normalising and hashing are CPU work: off the event loop.
        preprocessed = await asyncio.to_thread(self._template_and_hash, messages, images, tools)
        self._metrics.images_preprocessed.inc(len(preprocessed.images))
        self._metrics.seconds.observe(time.perf_counter() - started)
        return preprocessed

    def _template_and_hash(
        self,
        messages: list[ChatMessage],
        images: dict[PartPosition, Image.Image],
        tools: list[ToolDefinition] | None,
    ) -> PreprocessedRequest:
        tokenized = self._template.encode_chat(messages, images, tools)
        encoder_inputs = [
            ImageForEncoder(
                content_hash=content_hash(pixels),
                pixels=pixels,
                height=pixels.shape[1],
                width=pixels.shape[2],
            )
            for pixels in tokenized.image_pixels
        ]
        return PreprocessedRequest(prompt_token_ids=tokenized.prompt_token_ids, images=encoder_inputs)
