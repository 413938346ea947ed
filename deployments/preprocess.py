"""Preprocess stage: conversations with images -> prompt tokens + pixel arrays for the encoder.

Text-only conversations are templated inside the ingress process
(`serve.chat_template`): a separate deployment would add a network hop
and a serialisation to every request for microseconds of work. Conversations
with images come here. `ImagePreprocessor` fetches or unpacks each image's
bytes; an image whose bytes it has seen before comes from its cache, any
other is decoded, resized and normalised (mistral_common's image encoder)
and hashed. The chat template then lays out the conversation around the
images' [IMG] tokens, and the pixel arrays are left in Ray's object store
for the encoder.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import numpy as np
from mistral_common.tokens.tokenizers.image import ImageEncoding
from ray import serve

from deployments.image_loading import ImageError, decode_upright, load_image_bytes
from deployments.url_guard import Resolver, system_resolver
from serve.byte_budget_lru import ByteBudgetLru
from serve.chat_template import ChatTemplate, EncodedImage, PartPosition, image_positions
from serve.checkpoint import open_checkpoint
from serve.config import AppConfig, ImagesConfig
from serve.errors import BadRequest
from serve.messages import ImageForEncoder, PreprocessedRequest
from serve.metrics import (
    IMAGES_PREPROCESSED,
    PREPROCESS_CACHE_HITS,
    PREPROCESS_SECONDS,
    ray_metric,
)
from serve.protocol.chat import ChatMessage, ToolDefinition


def content_hash(pixels: np.ndarray) -> str:
    """Key of an image in the encoder's cache: the exact array the encoder would see."""
    digest = hashlib.blake2b(np.ascontiguousarray(pixels).data, digest_size=16)
    digest.update(repr(pixels.shape).encode())
    return digest.hexdigest()


def _image_param(position: PartPosition) -> str:
    i, j = position
    return f"messages[{i}].content[{j}].image_url"


def _invalid_image(position: PartPosition, error: ImageError) -> BadRequest:
    """The client's error for an image part that could not be fetched, unpacked or decoded."""
    param = _image_param(position)
    return BadRequest(f"{param}: {error}", param=param, code="invalid_image")


@dataclass(frozen=True)
class PreprocessedImage:
    """One image, decoded, resized and normalised: its [IMG] tokens and pixels for the chat
    template, and what the encoder gets."""

    encoding: ImageEncoding
    for_encoder: ImageForEncoder


class ImageLoader:
    """Fetches or unpacks the images of a conversation, all at once."""

    def __init__(self, limits: ImagesConfig, resolve: Resolver = system_resolver):
        self.limits = limits
        self._resolve = resolve
        # No kept-alive connections: each fetch connects to the address its URL was checked for.
        self._http = httpx.AsyncClient(
            timeout=limits.fetch_timeout_s, trust_env=False, limits=httpx.Limits(max_keepalive_connections=0)
        )
        self.fetch_slots = asyncio.Semaphore(limits.max_concurrent_fetches)

    async def load(self, messages: list[ChatMessage]) -> dict[PartPosition, bytes]:
        """The encoded bytes of every image part, by position. When one fails, the others are
        cancelled (their fetch slots freed) before its error is raised."""
        try:
            async with asyncio.TaskGroup() as group:
                loads = {
                    position: group.create_task(self._load_one(messages, position))
                    for position in image_positions(messages)
                }
        except ExceptionGroup as failed:
            # The first failure answers the client.
            raise failed.exceptions[0] from None
        return {position: load.result() for position, load in loads.items()}

    async def _load_one(self, messages: list[ChatMessage], position: PartPosition) -> bytes:
        i, j = position
        url = messages[i].content[j].image_url.url
        try:
            return await load_image_bytes(url, self.limits, self._http, self._resolve, self.fetch_slots)
        except ImageError as e:
            raise _invalid_image(position, e) from e


class ImagePreprocessor:
    """Conversations with images -> `PreprocessedRequest`, with an LRU of preprocessed images by
    the bytes they came from (within `cache_bytes`): a repeated image, which every turn of a chat
    about a picture sends again, is decoded, resized, normalised and hashed once."""

    def __init__(
        self,
        template: ChatTemplate,
        limits: ImagesConfig,
        cache_bytes: int,
        resolve: Resolver = system_resolver,
        count_cache_hits: Callable[[int], None] = lambda hits: None,
    ):
        self._template = template
        self._limits = limits
        self._loader = ImageLoader(limits, resolve)
        # Decoding an image can take hundreds of MiB and a CPU-second: at most decode_workers of them
        # at once (asyncio.to_thread's default pool runs as many as the cores + 4).
        self._decode_pool = ThreadPoolExecutor(limits.decode_workers, thread_name_prefix="image-decode")
        self._cache: ByteBudgetLru[PreprocessedImage] = ByteBudgetLru(
            cache_bytes, size_of=lambda image: image.for_encoder.pixels.nbytes
        )
        # Requests are preprocessed in the decode pool's threads.
        self._cache_lock = threading.Lock()
        self._count_cache_hits = count_cache_hits

    async def preprocess(
        self, messages: list[ChatMessage], tools: list[ToolDefinition] | None = None
    ) -> PreprocessedRequest:
        encoded_images = await self._loader.load(messages)
        # Decoding, resizing, normalising and hashing are CPU work: off the event loop.
        preprocessed, cache_hits = await asyncio.get_running_loop().run_in_executor(
            self._decode_pool, self._template_images, messages, encoded_images, tools
        )
        if cache_hits:
            self._count_cache_hits(cache_hits)
        return preprocessed

    def _template_images(
        self,
        messages: list[ChatMessage],
        encoded_images: dict[PartPosition, bytes],
        tools: list[ToolDefinition] | None,
    ) -> tuple[PreprocessedRequest, int]:
        keys = {position: _source_key(data) for position, data in encoded_images.items()}
        with self._cache_lock:
            cached = {position: self._cache.get(key) for position, key in keys.items()}
        images = {
            position: cached[position] or self._new_image(position, encoded_images[position], keys[position])
            for position in encoded_images
        }
        tokenized = self._template.encode_chat(
            messages, {position: EncodedImage(image.encoding) for position, image in images.items()}, tools
        )
        # In prompt order, which mistral_common decides: each array it returns is an encoding's own.
        for_encoder = {id(image.encoding.image): image.for_encoder for image in images.values()}
        preprocessed = PreprocessedRequest(
            prompt_token_ids=tokenized.prompt_token_ids,
            images=[for_encoder[id(pixels)] for pixels in tokenized.image_pixels],
        )
        return preprocessed, sum(image is not None for image in cached.values())

    def _new_image(self, position: PartPosition, data: bytes, key: str) -> PreprocessedImage:
        try:
            decoded = decode_upright(data, self._limits, self._template.max_image_side_px)
        except ImageError as e:
            raise _invalid_image(position, e) from e
        encoding = self._template.encode_image(decoded, _image_param(position))
        pixels = encoding.image
        image = PreprocessedImage(
            encoding=encoding,
            for_encoder=ImageForEncoder(
                content_hash=content_hash(pixels),
                pixels=pixels,
                height=pixels.shape[1],
                width=pixels.shape[2],
            ),
        )
        with self._cache_lock:
            self._cache.put(key, image)
        return image


def _source_key(encoded_image: bytes) -> str:
    return hashlib.blake2b(encoded_image, digest_size=16).hexdigest()


class PreprocessMetrics:
    """The preprocess stage's metrics (serve/metrics.py catalogues them)."""

    def __init__(self):
        self.images_preprocessed = ray_metric(IMAGES_PREPROCESSED)
        self.cache_hits = ray_metric(PREPROCESS_CACHE_HITS)
        self.seconds = ray_metric(PREPROCESS_SECONDS)


@serve.deployment(name="Preprocess")
class Preprocess:
    """Image requests: fetch, decode, template; pixel arrays go to the object store."""

    def __init__(self, config: AppConfig):
        template = ChatTemplate.from_config(open_checkpoint(config.model, weights=False), config)
        self._metrics = PreprocessMetrics()
        self._preprocessor = ImagePreprocessor(
            template,
            config.images,
            config.images.preprocessed_cache_bytes,
            count_cache_hits=self._metrics.cache_hits.inc,
        )

    async def check_health(self) -> None:
        """Serve's periodic check, and the ingress's /health probe: answering is the check."""

    async def preprocess(
        self, messages: list[ChatMessage], tools: list[ToolDefinition] | None = None
    ) -> PreprocessedRequest:
        started = time.perf_counter()
        preprocessed = await self._preprocessor.preprocess(messages, tools)
        self._metrics.images_preprocessed.inc(len(preprocessed.images))
        self._metrics.seconds.observe(time.perf_counter() - started)
        return preprocessed
