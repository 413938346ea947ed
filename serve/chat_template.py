"""OpenAI messages -> the token sequence the model was trained on.

Chat templating is mistral_common's (the tokenizer and message format Mistral
trains with), never a hand-written template: this module only translates the
OpenAI request into mistral_common's messages (text, images, tool calls,
tool results, reasoning traces) and names the offending field when a message
cannot be translated. It runs in the ingress for text-only conversations and
in the Preprocess deployment for conversations with images.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk, ThinkChunk
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest as MistralChatRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.image import ImageEncoder, ImageEncoding
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image

from serve.checkpoint import Checkpoint
from serve.config import AppConfig
from serve.errors import BadRequest
from serve.protocol.chat import ChatMessage, ImageContentPart, TextContentPart, ToolDefinition

# Where an image sits in a conversation: (message index, content part index).
PartPosition = tuple[int, int]


@dataclass(frozen=True)
class TokenizedChat:
    """A conversation rendered by the chat template."""

    prompt_token_ids: list[int]  # [num_prompt_tokens]
    # In prompt order; each float32 [3, height, width], normalised, height and
    # width multiples of patch_size x spatial_merge_size.
    image_pixels: list[np.ndarray] = field(default_factory=list)


class EncodedImage(Image.Image):
    """An image whose encoding (mistral_common's `ImageEncoding`: its [IMG] tokens and normalised
    pixels) is already known, passed to `ChatTemplate.encode_chat` in place of the decoded image:
    the preprocess stage resizes and normalises a repeated image once (`ChatTemplate.encode_image`)."""

    def __init__(self, encoding: ImageEncoding):
        super().__init__()
        self.encoding = encoding


class _KnownEncodings:
    """mistral_common's image encoder, answering an `EncodedImage` with the encoding it carries."""

    def __init__(self, encoder: ImageEncoder):
        self.encoder = encoder

    def __call__(self, content: ImageChunk) -> ImageEncoding:
        if isinstance(content.image, EncodedImage):
            return content.image.encoding
        return self.encoder(content)

    def __getattr__(self, name: str):
        return getattr(self.encoder, name)


def image_positions(messages: list[ChatMessage]) -> list[PartPosition]:
    return [
        (i, j)
        for i, message in enumerate(messages)
        if isinstance(message.content, list)
        for j, part in enumerate(message.content)
        if isinstance(part, ImageContentPart)
    ]


class ChatTemplate:
    def __init__(
        self,
        checkpoint: Checkpoint,
        *,
        use_default_system_prompt: bool = True,
        today: Callable[[], dt.date] = dt.date.today,
    ):
        self.checkpoint = checkpoint
        self.tokenizer = MistralTokenizer.from_file(str(checkpoint.tokenizer_file), mode=ValidationMode.test)
        instruct = self.tokenizer.instruct_tokenizer
        self._image_encoder: ImageEncoder | None = instruct.image_encoder
        if self._image_encoder is not None:
            instruct.image_encoder = _KnownEncodings(self._image_encoder)
        self._use_default_system_prompt = use_default_system_prompt
        self._today = today

    @classmethod
    def from_config(cls, checkpoint: Checkpoint, config: AppConfig) -> ChatTemplate:
        """The template a replica uses: the default system prompt and its date as configured."""
        pinned = config.system_prompt_date
        return cls(
            checkpoint,
            use_default_system_prompt=config.use_default_system_prompt,
            today=dt.date.today if pinned is None else lambda: pinned,
        )

    @property
    def image_token_id(self) -> int:
        """Token id of [IMG], read from the checkpoint's own tokenizer file."""
        if self._image_encoder is None:
            raise ValueError(f"{self.checkpoint.tokenizer_file} has no image settings")
        return self._image_encoder.special_ids.img

    @property
    def max_image_side_px(self) -> int | None:
        """The longest side the tokenizer resizes an image down to (None: the model takes no images)."""
        return None if self._image_encoder is None else self._image_encoder.image_config.max_image_size

    def encode_image(self, image: Image.Image, param: str) -> ImageEncoding:
        """One decoded image's [IMG] tokens and normalised pixels, as `encode_chat` lays them out;
        `param` names the content part in a client's error."""
        if self._image_encoder is None:
            raise BadRequest(f"{param}: this model does not take images", param=param)
        try:
            return self._image_encoder(ImageChunk(image=image))
        except (MistralCommonException, ValueError, AssertionError) as e:
            raise BadRequest(f"{param}: {e}", param=param) from e

    def default_system_prompt(self) -> str | None:
        if not self._use_default_system_prompt:
            return None
        return self.checkpoint.system_prompt(self._today())

    def encode_chat(
        self,
        messages: list[ChatMessage],
        images: dict[PartPosition, Image.Image] | None = None,
        tools: list[ToolDefinition] | None = None,
    ) -> TokenizedChat:
        """Render and tokenize a conversation; client mistakes raise BadRequest.

        `images` holds the decoded image of every image part, by position, or its
        `EncodedImage`.
        """
        check_tool_results(messages)
        images = images or {}
        mistral_messages = [_to_mistral_message(i, m, images) for i, m in enumerate(messages)]
        if not any(isinstance(m, SystemMessage) for m in mistral_messages):
            system_prompt = self.default_system_prompt()
            if system_prompt:
                mistral_messages.insert(0, SystemMessage(content=system_prompt))
        mistral_tools = [_to_mistral_tool(tool) for tool in tools or []] or None
        try:
            tokenized = self.tokenizer.encode_chat_completion(
                MistralChatRequest(messages=mistral_messages, tools=mistral_tools)
            )
        except (MistralCommonException, ValueError, AssertionError) as e:
            raise BadRequest(f"messages: {e}", param="messages") from e
        return TokenizedChat(prompt_token_ids=list(tokenized.tokens), image_pixels=list(tokenized.images))

    def encode_text(self, text: str, *, add_bos: bool = True) -> list[int]:
        """A raw prompt (completions), tokenized as vLLM's Mistral tokenizer does."""
        return self.tokenizer.instruct_tokenizer.tokenizer.encode(text, bos=add_bos, eos=False)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)

    def decode_each(self, token_ids: list[int]) -> list[str]:
        """Each token's own text (/tokenize's token_strs)."""
        return [self.tokenizer.decode([token_id]) for token_id in token_ids]


def check_tool_results(messages: list[ChatMessage]) -> None:
    """Each tool message answers a call an earlier assistant message made, once."""
    open_calls: set[str] = set()
    for i, message in enumerate(messages):
        if message.role == "assistant":
            open_calls = {call.id for call in message.tool_calls or []}
        elif message.role == "tool":
            if message.tool_call_id not in open_calls:
                param = f"messages[{i}].tool_call_id"
                raise BadRequest(
                    f"{param}: {message.tool_call_id!r} answers no open tool call of the assistant "
                    f"message before it (open calls: {sorted(open_calls)})",
                    param=param,
                )
            open_calls.discard(message.tool_call_id)


def _to_mistral_tool(tool: ToolDefinition) -> Tool:
    return Tool(
        function=Function(
            name=tool.function.name,
            description=tool.function.description or "",
            parameters=tool.function.parameters or {"type": "object", "properties": {}},
        )
    )


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
    if message.role == "tool":
        return ToolMessage(content=text, tool_call_id=message.tool_call_id)
    return _assistant_message(index, message, text)


def _assistant_message(index: int, message: ChatMessage, text: str) -> AssistantMessage:
    tool_calls = []
    for j, call in enumerate(message.tool_calls or []):
        param = f"messages[{index}].tool_calls[{j}].function.arguments"
        try:
            arguments = json.loads(call.function.arguments)
        except json.JSONDecodeError as e:
            raise BadRequest(f"{param}: not valid JSON: {e}", param=param) from e
        if not isinstance(arguments, dict):
            raise BadRequest(f"{param}: must be a JSON object", param=param)
        tool_calls.append(
            ToolCall(
                id=call.id, function=FunctionCall(name=call.function.name, arguments=call.function.arguments)
            )
        )
    content: str | list | None = text or None
    # The trace goes back in front of the answer, as the model wrote it.
    if message.reasoning_trace:
        content = [ThinkChunk(thinking=message.reasoning_trace), *([TextChunk(text=text)] if text else [])]
    return AssistantMessage(content=content, tool_calls=tool_calls or None)


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
