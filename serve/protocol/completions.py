"""`POST /v1/completions` (raw prompts) and the operators' `POST /tokenize`, `POST /detokenize`."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, Field, model_validator

from serve.protocol.chat import ChatMessage
from serve.protocol.common import FieldError, FinishReason, OpenAIBaseModel, SamplingFields, Usage

TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    # One prompt: text, or token ids.
    prompt: Annotated[str, Field(min_length=1)] | TokenIds
    echo: bool = False
    # OpenAI's legacy logprobs: the number of most likely tokens to return per position.
    logprobs: Annotated[int | None, Field(ge=0, le=20)] = None

    UNSUPPORTED: ClassVar[tuple[str, ...]] = ("suffix", "best_of")


def new_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None
    token_ids: list[int] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    prompt_token_ids: list[int] | None = None


class TokenizeRequest(OpenAIBaseModel):
    """vLLM's operator endpoint: a raw prompt or a conversation, as the model would see it."""

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise FieldError("prompt", "send either prompt or messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


class DetokenizeResponse(BaseModel):
    prompt: str
