"""Typed messages that cross a stage boundary (ingress -> preprocess -> decoder)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class PreprocessedRequest:
    """A conversation rendered by the chat template (mistral_common)."""

    prompt_token_ids: list[int]  # [num_prompt_tokens]


@dataclass(frozen=True)
class SamplingSettings:
    """What the client asked for; None means the checkpoint's default (generation_config.json)."""

    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass(frozen=True)
class DecodeRequest:
    request_id: str
    prompt_token_ids: list[int]  # [num_prompt_tokens]
    sampling: SamplingSettings


FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class DecodeChunk:
    """Newly generated text and tokens of one request since the previous chunk."""

    text: str
    token_ids: list[int]  # [num_new_tokens]
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class EngineInfo:
    """What the ingress needs to know about the engine behind the decoder."""

    max_model_len: int
    vocab_size: int
