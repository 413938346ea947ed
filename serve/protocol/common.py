"""Schema pieces every endpoint shares: the lenient base model, sampling fields, usage, errors."""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve.errors import echoed


class OpenAIBaseModel(BaseModel):
    # Unknown fields are kept (in `model_extra`) so the ingress can log them.
    model_config = ConfigDict(extra="allow")

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class FieldError(ValueError):
    """A check across fields that still names the one field to fix (relative to the model)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


_UNION_MEMBER_LABELS = {"str", "int", "float", "bool", "list", "dict", "none"}


def error_param(location: tuple[str | int, ...]) -> str | None:
    """A pydantic error location as the request field it names: `messages[0].content`.

    Union member labels (`str`, `list[...]`, `constrained-str`, model class
    names, tags) are not fields (those are snake_case) and are dropped.
    """
    param = ""
    for part in location:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part.lower() in _UNION_MEMBER_LABELS or any(c in part for c in "[ -") or part[:1].isupper():
            continue
        else:
            param += f".{part}" if param else part
    return param or None


# A token id as a logit_bias key: ids are below 2**31. str.isdigit would pass "²" and a
# 5,000-digit number, which int() then refuses.
_TOKEN_ID_KEY = re.compile(r"[0-9]{1,10}")


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


FinishReason = Literal["stop", "length", "tool_calls", "abort"]


class SamplingFields(OpenAIBaseModel):
    """Request fields that choose how tokens are sampled, shared by chat and completions."""

    model: str
    temperature: Annotated[float | None, Field(ge=0.0, le=2.0)] = None
    top_p: Annotated[float | None, Field(gt=0.0, le=1.0)] = None
    max_tokens: Annotated[int | None, Field(ge=1)] = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Annotated[float | None, Field(ge=-2.0, le=2.0)] = None
    frequency_penalty: Annotated[float | None, Field(ge=-2.0, le=2.0)] = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    n: Annotated[int, Field(ge=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extensions: top-k / min-p sampling; return the prompt's and the
    # completion's token ids; keep generating past the end-of-sequence token.
    top_k: Annotated[int | None, Field(ge=-1)] = None
    min_p: Annotated[float | None, Field(ge=0.0, le=1.0)] = None
    return_token_ids: bool = False
    ignore_eos: bool = False
    # This service's extensions: the request's priority, at most its key's (serve/tenants.py),
    # and how long the client will wait for the whole answer (X-Request-Timeout, in the body).
    priority: Literal["high", "normal", "low"] | None = None
    request_timeout: Annotated[float | None, Field(gt=0)] = None

    @field_validator("stop")
    @classmethod
    def _non_empty_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if stop == "" or (isinstance(stop, list) and any(s == "" for s in stop)):
            raise ValueError("stop sequences must be non-empty strings")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _token_ids_as_keys(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key in bias or {}:
            if not _TOKEN_ID_KEY.fullmatch(key):
                raise ValueError(f"keys must be token ids (up to 10 ASCII digits), got {echoed(key, 24)!r}")
        return bias

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "only allowed when stream is true")
        return self

    @property
    def stop_sequences(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def completion_token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def unsupported_fields(self) -> list[str]:
        """Fields of the OpenAI API this service does not implement, present in the request."""
        extra = self.model_extra or {}
        return [name for name in self.UNSUPPORTED if extra.get(name) not in (None, [], False)]

    # Refused rather than ignored: ignoring them would return something the
    # client did not ask for.
    UNSUPPORTED: ClassVar[tuple[str, ...]] = ()


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails | None = None


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def error_payload(message: str, type_: str, param: str | None, code: Any) -> dict:
    return ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param, code=code)).model_dump()


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ministral-serve"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
