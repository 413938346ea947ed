"""The OpenAI-compatible HTTP API: request and response schemas.

Lenient where OpenAI is (unknown request fields are accepted and logged),
strict where it matters (wrong types and out-of-range values are 400s naming
the field). No torch import here: this module is the API contract.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator


class OpenAIBaseModel(BaseModel):
    # Unknown fields are kept (in `model_extra`) so the ingress can log them.
    model_config = ConfigDict(extra="allow")

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class TextContentPart(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class ImageURL(OpenAIBaseModel):
    # http(s):// or data:image/...;base64,...
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImageContentPart(OpenAIBaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class ContentPart(OpenAIBaseModel):
    """Any other content part type: parsed so that the error can name it."""

    type: str


def _content_part_kind(part: Any) -> str:
    kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
    return kind if kind in ("text", "image_url") else "other"


_UNION_MEMBER_LABELS = {"str", "int", "float", "bool", "list", "dict", "none"}


def error_param(location: tuple[str | int, ...]) -> str | None:
    """A pydantic error location as the request field it names: `messages[0].content`.

    Union member labels (`str`, `list[...]`, tags) are not fields and are dropped.
    """
    param = ""
    for part in location:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part.lower() in _UNION_MEMBER_LABELS or "[" in part or " " in part:
            continue
        else:
            param += f".{part}" if param else part
    return param or None


# Tags with a space: `error_param` drops them from error locations.
AnyContentPart = Annotated[
    Annotated[TextContentPart, Tag("text part")]
    | Annotated[ImageContentPart, Tag("image_url part")]
    | Annotated[ContentPart, Tag("other part")],
    Discriminator(lambda part: f"{_content_part_kind(part)} part"),
]


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[AnyContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text; raises ValueError for content parts we cannot read."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if not isinstance(part, TextContentPart):
                where = "in user messages only" if isinstance(part, ImageContentPart) else "not supported"
                raise ValueError(f"content part type {part.type!r} is {where}")
            texts.append(part.text)
        return "".join(texts)


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


# Request fields that are part of the OpenAI API but not implemented yet.
# They are refused rather than ignored: ignoring `tools` or `response_format`
# would return something the client did not ask for.
UNSUPPORTED_FIELDS = (
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "response_format",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "audio",
    "modalities",
    "prediction",
)


class ChatCompletionRequest(OpenAIBaseModel):
    model: str
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    temperature: Annotated[float | None, Field(ge=0.0, le=2.0)] = None
    top_p: Annotated[float | None, Field(gt=0.0, le=1.0)] = None
    max_tokens: Annotated[int | None, Field(ge=1)] = None
    max_completion_tokens: Annotated[int | None, Field(ge=1)] = None
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    seed: int | None = None
    presence_penalty: Annotated[float | None, Field(ge=-2.0, le=2.0)] = None
    frequency_penalty: Annotated[float | None, Field(ge=-2.0, le=2.0)] = None
    n: Annotated[int, Field(ge=1, le=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extensions: return the prompt's and the completion's token ids;
    # keep generating past the end-of-sequence token (load tests).
    return_token_ids: bool = False
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _non_empty_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if stop == "" or (isinstance(stop, list) and any(s == "" for s in stop)):
            raise ValueError("stop sequences must be non-empty strings")
        return stop

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> ChatCompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def stop_sequences(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def completion_token_limit(self) -> int | None:
        # max_completion_tokens is the newer name; it wins when both are sent.
        return self.max_completion_tokens or self.max_tokens

    def unsupported_fields(self) -> list[str]:
        extra = self.model_extra or {}
        return [name for name in UNSUPPORTED_FIELDS if extra.get(name) not in (None, [], False)]


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length", "abort"]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage
    prompt_token_ids: list[int] | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionStreamChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: None = None
    token_ids: list[int] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: Usage | None = None
    prompt_token_ids: list[int] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ministral-serve"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def error_payload(message: str, type_: str, param: str | None, code: Any) -> dict:
    return ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param, code=code)).model_dump()
