"""Preprocess stage: OpenAI messages -> the token sequence (and images) the model takes.

Chat templating is mistral_common's (the tokenizer and message format Mistral
trains with), never a hand-written template. `ChatPreprocessor` does the work
without Ray. Text-only conversations are templated inside the ingress process:
a separate deployment would add a network hop and a serialisation to every
request for microseconds of work. Conversations with images go to the
`Preprocess` deployment, which fetches and decodes the images, templates, and
leaves the pixel arrays in Ray's object store for the encoder.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import numpy as np
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    SystemMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest as MistralChatRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image
from ray import serve

from deployments.checkpoint import Checkpoint, open_checkpoint
from deployments.image_loading import ImageError, load_image
from deployments.messages import ImageForEncoder, PreprocessedRequest
from serve.config import AppConfig, ImagesConfig
from serve.errors import BadRequest
from serve.protocol import ChatMessage, ImageContentPart, TextContentPart

# Where an image sits in a conversation: (message index, content part index).
PartPosition = tuple[int, int]


@dataclass(frozen=True)
class TokenizedChat:
    """A conversation rendered by the chat template."""

    prompt_token_ids: list[int]  # [num_prompt_tokens]
    # In prompt order; each float32 [3, height, width], normalised, height and
    # width multiples of patch_size x spatial_merge_size.
    image_pixels: list[np.ndarray] = field(default_factory=list)


def image_positions(messages: list[ChatMessage]) -> list[PartPosition]:
    return [
        (i, j)
        for i, message in enumerate(messages)
        if isinstance(message.content, list)
        for j, part in enumerate(message.content)
        if isinstance(part, ImageContentPart)
    ]


def content_hash(pixels: np.ndarray) -> str:
    """Key of an image in the encoder's cache: the exact array the encoder would see."""
    digest = hashlib.blake2b(np.ascontiguousarray(pixels).data, digest_size=16)
    digest.update(repr(pixels.shape).encode())
    return digest.hexdigest()


class ChatPreprocessor:
    def __init__(
        self,
        checkpoint: Checkpoint,
        *,
        use_default_system_prompt: bool = True,
        today: Callable[[], dt.date] = dt.date.today,
    ):
        self.checkpoint = checkpoint
        self.tokenizer = MistralTokenizer.from_file(str(checkpoint.tokenizer_file), mode=ValidationMode.test)
        self._use_default_system_prompt = use_default_system_prompt
        self._today = today

    @property
    def image_token_id(self) -> int:
        """Token id of [IMG], read from the checkpoint's own tokenizer file."""
        image_encoder = self.tokenizer.instruct_tokenizer.image_encoder
        if image_encoder is None:
            raise ValueError(f"{self.checkpoint.tokenizer_file} has no image settings")
        return image_encoder.special_ids.img

    def default_system_prompt(self) -> str | None:
        if not self._use_default_system_prompt:
            return None
        return self.checkpoint.system_prompt(self._today())

    def encode_chat(
        self, messages: list[ChatMessage], images: dict[PartPosition, Image.Image] | None = None
    ) -> TokenizedChat:
        """Render and tokenize a conversation; client mistakes raise BadRequest.

        `images` holds the decoded image of every image part, by position.
        """
        images = images or {}
        mistral_messages = [_to_mistral_message(i, m, images) for i, m in enumerate(messages)]
        if not any(isinstance(m, SystemMessage) for m in mistral_messages):
            system_prompt = self.default_system_prompt()
            if system_prompt:
                mistral_messages.insert(0, SystemMessage(content=system_prompt))
        try:
            tokenized = self.tokenizer.encode_chat_completion(MistralChatRequest(messages=mistral_messages))
        except (MistralCommonException, ValueError, AssertionError) as e:
            raise BadRequest(f"messages: {e}", param="messages") from e
        return TokenizedChat(prompt_token_ids=list(tokenized.tokens), image_pixels=list(tokenized.images))


def _to_mistral_message(index: int, message: ChatMessage, images: dict[PartPosition, Image.Image]):
    param = f"messages[{index}].content"
    has_images = isinstance(message.content, list) and any(
        isinstance(part, ImageContentPart) for part in message.content
    )
    if message.role == "user" and has_images:
        return UserMessage(content=_user_chunks(index, message, images))
    try:
        text = message.text()
    except ValueError as e:
        raise BadRequest(f"{param}: {e}", param=param) from e
    if message.role in ("system", "developer"):
        return SystemMessage(content=text)
    if message.role == "user":
        return UserMessage(content=text)
    if message.role == "assistant":
        return AssistantMessage(content=text)
    raise BadRequest(
        f"messages[{index}].role: role {message.role!r} is not supported yet "
        "(tool messages come with tool calling)",
        param=f"messages[{index}].role",
    )


def _user_chunks(index: int, message: ChatMessage, images: dict[PartPosition, Image.Image]) -> list:
    chunks = []
    for j, part in enumerate(message.content or []):
        if isinstance(part, TextContentPart):
            chunks.append(TextChunk(text=part.text))
        elif isinstance(part, ImageContentPart):
            if (index, j) not in images:
                raise ValueError(f"image part ({index}, {j}) was not loaded")
            chunks.append(ImageChunk(image=images[(index, j)]))
        else:
            param = f"messages[{index}].content[{j}]"
            raise BadRequest(f"{param}: content part type {part.type!r} is not supported", param=param)
    return chunks


class ImageLoader:
    """Fetches and decodes the images of a conversation, all at once."""

    def __init__(self, limits: ImagesConfig):
        self.limits = limits
        self._http = httpx.AsyncClient(timeout=limits.fetch_timeout_s, trust_env=False)

    async def load(self, messages: list[ChatMessage]) -> dict[PartPosition, Image.Image]:
        positions = image_positions(messages)
        loaded = await asyncio.gather(*(self._load_one(messages, position) for position in positions))
        return dict(zip(positions, loaded, strict=True))

    async def _load_one(self, messages: list[ChatMessage], position: PartPosition) -> Image.Image:
        i, j = position
        part = messages[i].content[j]
        try:
            image = await load_image(part.image_url.url, self.limits, self._http)
        except ImageError as e:
            param = f"messages[{i}].content[{j}].image_url"
            raise BadRequest(f"{param}: {e}", param=param, code="invalid_image") from e
        return image


class PreprocessMetrics:
    """The preprocess stage's metrics (Ray Serve adds deployment and replica tags)."""

    def __init__(self):
        from ray.serve.metrics import Counter, Histogram

        self.images_preprocessed = Counter(
            "ministral_images_preprocessed", description="Images fetched, decoded and templated."
        )
        self.seconds = Histogram(
            "ministral_preprocess_seconds",
            description="Time to preprocess one request with images (fetch, decode, template).",
            boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
        )


@serve.deployment(name="Preprocess")
class Preprocess:
    """Image requests: fetch, decode, template; pixel arrays go to the object store."""

    def __init__(self, config: AppConfig):
        self._preprocessor = ChatPreprocessor(
            open_checkpoint(config.model), use_default_system_prompt=config.use_default_system_prompt
        )
        self._loader = ImageLoader(config.images)
        self._metrics = PreprocessMetrics()

    async def preprocess(self, messages: list[ChatMessage]) -> PreprocessedRequest:
        started = time.perf_counter()
        images = await self._loader.load(messages)
        # Resizing, normalising and hashing are CPU work: off the event loop.
        preprocessed = await asyncio.to_thread(self._template_and_store, messages, images)
        self._metrics.images_preprocessed.inc(len(preprocessed.images))
        self._metrics.seconds.observe(time.perf_counter() - started)
        return preprocessed

    def _template_and_store(
        self, messages: list[ChatMessage], images: dict[PartPosition, Image.Image]
    ) -> PreprocessedRequest:
        import ray

        tokenized = self._preprocessor.encode_chat(messages, images)
        encoder_inputs = [
            ImageForEncoder(
                content_hash=content_hash(pixels),
                pixels=ray.put(pixels),
                height=pixels.shape[1],
                width=pixels.shape[2],
            )
            for pixels in tokenized.image_pixels
        ]
        return PreprocessedRequest(prompt_token_ids=tokenized.prompt_token_ids, images=encoder_inputs)
