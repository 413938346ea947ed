"""`POST /v1/chat/completions`: messages, tools, response formats, and the replies."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, Discriminator, Field, Tag, field_validator, model_validator

from serve.protocol.common import FieldError, FinishReason, OpenAIBaseModel, SamplingFields, Usage


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


# Tags with a space: `error_param` drops them from error locations.
AnyContentPart = Annotated[
    Annotated[TextContentPart, Tag("text part")]
    | Annotated[ImageContentPart, Tag("image_url part")]
    | Annotated[ContentPart, Tag("other part")],
    Discriminator(lambda part: f"{_content_part_kind(part)} part"),
]


class FunctionCall(OpenAIBaseModel):
    name: Annotated[str, Field(min_length=1)]
    arguments: str  # a JSON object, as text


class ToolCall(OpenAIBaseModel):
    id: Annotated[str, Field(min_length=1)]
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[AnyContentPart] | None = None
    name: str | None = None
    # assistant turns
    tool_calls: list[ToolCall] | None = None
    # The reasoning trace of an assistant turn, sent back so that it stays in
    # context (the Reasoning model card asks for it). `reasoning` is vLLM's name.
    reasoning_content: str | None = None
    reasoning: str | None = None
    # tool turns
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _fields_of_the_role(self) -> ChatMessage:
        # As OpenAI's API: only an assistant message that calls tools may go without content.
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            needs = "content or tool_calls" if self.role == "assistant" else "content"
            raise FieldError("content", f"{self.role} messages need {needs} (a string or a list of parts)")
        if self.role == "tool" and not self.tool_call_id:
            raise FieldError("tool_call_id", "tool messages need the id of the call they answer")
        if self.role != "assistant" and self.tool_calls:
            raise FieldError("tool_calls", "only assistant messages carry tool calls")
        if self.role != "assistant" and self.reasoning_trace:
            raise FieldError("reasoning_content", "only assistant messages carry reasoning")
        return self

    @property
    def reasoning_trace(self) -> str | None:
        return self.reasoning_content or self.reasoning

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


class FunctionDefinition(OpenAIBaseModel):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")]
    description: str | None = None
    # JSON Schema of the arguments; checked by compiling it into a grammar.
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(OpenAIBaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(OpenAIBaseModel):
    name: str


class NamedToolChoice(OpenAIBaseModel):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["auto", "none", "required"] | NamedToolChoice


class JsonSchemaFormat(OpenAIBaseModel):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    # `schema` is the wire name; pydantic reserves the attribute.
    json_schema: Annotated[dict[str, Any], Field(alias="schema")]
    strict: bool | None = None


class ResponseFormat(OpenAIBaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise FieldError("json_schema", "type json_schema needs a json_schema object with the schema")
        if self.type != "json_schema" and self.json_schema is not None:
            raise FieldError("json_schema", f"only allowed with type json_schema, not {self.type}")
        return self


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int | None, Field(ge=1)] = None
    logprobs: bool = False
    top_logprobs: Annotated[int | None, Field(ge=0, le=20)] = None
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None

    UNSUPPORTED: ClassVar[tuple[str, ...]] = (
        "functions",
        "function_call",
        "audio",
        "prediction",
        "web_search_options",
    )

    @model_validator(mode="after")
    def _consistent_options(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("top_logprobs", "needs logprobs: true")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise FieldError("tool_choice", "a tool choice other than auto or none needs tools")
        return self

    @field_validator("tools")
    @classmethod
    def _unique_tool_names(cls, tools: list[ToolDefinition] | None) -> list[ToolDefinition] | None:
        names = [tool.function.name for tool in tools or []]
        if duplicated := sorted({name for name in names if names.count(name) > 1}):
            raise ValueError(f"tool names must be unique; repeated: {duplicated}")
        return tools

    @property
    def completion_token_limit(self) -> int | None:
        # max_completion_tokens is the newer name; it wins when both are sent.
        return self.max_completion_tokens or self.max_tokens

    @property
    def completion_token_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"

    @property
    def effective_tool_choice(self) -> ToolChoice:
        """OpenAI's default: auto when tools are given, else none."""
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    @property
    def calls_tools(self) -> bool:
        return bool(self.tools) and self.effective_tool_choice != "none"


def new_chat_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: ChoiceLogprobs | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str
    choices: list[ChatCompletionChoice]
    usage: Usage
    prompt_token_ids: list[int] | None = None


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatCompletionStreamChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None
    token_ids: list[int] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatCompletionStreamChoice]
    usage: Usage | None = None
    prompt_token_ids: list[int] | None = None
