"""Typed messages that cross a stage boundary.

ingress -(messages)-> Preprocess -(PreprocessedRequest)-> ingress
ingress -(ImageForEncoder list)-> Encoder -(ImageTokenEmbeddings)-> Decoder
ingress -(DecodeRequest)-> Decoder -(DecodeChunk stream)-> ingress

Pixel arrays and embeddings go stage to stage through Ray's object store;
the ingress only ever holds references to them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ImageForEncoder:
    """One image of a prompt, ready for the vision encoder."""

    content_hash: str  # of the pixel array: the encoder's cache key
    # ray.ObjectRef to float32 [3, height, width], normalised as mistral_common does.
    pixels: Any
    height: int
    width: int


@dataclass(frozen=True)
class PreprocessedRequest:
    """A conversation with images, rendered by the chat template (mistral_common)."""

    prompt_token_ids: list[int]  # [num_prompt_tokens], [IMG] placeholders included
    images: list[ImageForEncoder] = field(default_factory=list)  # in prompt order


@dataclass(frozen=True)
class ImageTokenEmbeddings:
    """The encoder's output for the images of one prompt, in prompt order."""

    # [num_image_tokens_of_all_images, text_hidden_size], one row per [IMG] token.
    embeddings: torch.Tensor


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
