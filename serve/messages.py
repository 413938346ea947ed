"""Typed messages that cross a stage boundary.

ingress -(messages)-> Preprocess -(PreprocessedRequest)-> ingress
Preprocess's response, passed on unresolved -> Encoder -(ImageTokenEmbeddings)-> Decoder
ingress -(DecodeRequest)-> Decoder -(DecodeChunk stream)-> ingress

Pixel arrays and embeddings go stage to stage through Ray's object store:
the ingress hands a stage's response to the next stage without resolving it
(pixel arrays it reads for the prompt are mapped, not copied). They travel
inline in the messages, never as ObjectRefs nested inside them: Ray's
reference counting lost such a nested ref (`ReferenceCountingAssertionError`)
under a dozen concurrent image requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import numpy as np
    import torch


@dataclass(frozen=True)
class ImageForEncoder:
    """One image of a prompt, ready for the vision encoder."""

    content_hash: str  # of the pixel array: the encoder's cache key
    pixels: np.ndarray  # float32 [3, height, width], normalised as mistral_common does
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
    # The encoder's time for these images (a batch's time shared among its images; a cached
    # image costs none), charged to the request's tenant.
    encoder_seconds: float = 0.0


@dataclass(frozen=True)
class SamplingSettings:
    """What the client asked for; None means the checkpoint's default (generation_config.json)."""

    max_tokens: int
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[int, float] | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    # Most likely tokens reported per generated position (0: the sampled one
    # only; None: no logprobs), and per prompt position (completions' echo).
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # A Lark grammar (llguidance) the output must match: tool calls, JSON.
    grammar: str | None = None


@dataclass(frozen=True)
class ToolSpec:
    name: str
    parameters: dict | None  # JSON Schema of the arguments


@dataclass(frozen=True)
class OutputParsing:
    """How the decoder splits a chat completion's text (vLLM's Mistral parser)."""

    # The tools offered, when the model may call them.
    tools: list[ToolSpec] | None = None
    reasoning: bool = False


@dataclass(frozen=True)
class DecodeRequest:
    request_id: str
    prompt_token_ids: list[int]  # [num_prompt_tokens]
    sampling: SamplingSettings
    # None: raw text (completions, or chat without tools on a non-reasoning model).
    parsing: OutputParsing | None = None
    # vLLM's priority scheduling: the lowest is served first (serve.tenants.PRIORITY_RANK).
    priority: int = 1


FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str  # as decoded; may be "" for a piece of a multi-byte character
    token_bytes: bytes  # the token's exact bytes
    logprob: float


@dataclass(frozen=True)
class PositionLogprobs:
    """The token at one position and the most likely alternatives there."""

    chosen: TokenLogprob
    top: list[TokenLogprob]


@dataclass(frozen=True)
class ToolCallDelta:
    index: int  # of the call within the choice
    id: str | None = None  # set on the call's first delta, with the name
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True)
class ChoiceDelta:
    """What one choice (of `n`) generated since the previous chunk."""

    index: int
    text: str  # content (parsed) or raw text (no parsing)
    token_ids: list[int]  # [num_new_tokens]
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None  # one per new token
    finish_reason: FinishReason | None = None
    reasoning_tokens: int = 0  # in the whole completion, set with finish_reason


@dataclass(frozen=True)
class DecodeChunk:
    choices: list[ChoiceDelta]
    # Per prompt position (the first is None), in the first chunk when asked for.
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    # In the first chunk of a request with images: the encoder's time for them.
    encoder_seconds: float = 0.0


@dataclass(frozen=True)
class EngineInfo:
    """What the ingress needs to know about the engine behind the decoder."""

    max_model_len: int
    vocab_size: int
    system_fingerprint: str
    # The KV cache as vLLM sized it at start-up (its "KV cache size" log line).
    kv_cache_blocks: int = 0
    kv_block_size: int = 0
    kv_cache_tokens: int = 0
    max_concurrency: float = 0.0


@dataclass(frozen=True)
class DecoderLoad:
    """A decoder replica's routing stats (`record_routing_stats`), read by the decoder router.

    running, waiting and kv_cache_usage are vLLM's scheduler stats at its last
    step; the token counts are exact sums over the requests the replica holds;
    step_s, batch and tokens_per_s are measured over a sliding window of the
    engine's steps while it had work (0 until it has generated)."""

    measured_at: float  # time.time() on the replica
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0  # 0..1
    kv_cache_tokens: int = 0
    prefill_tokens_pending: int = 0  # prompt tokens of requests not yet past their first token
    decode_tokens_pending: int = 0  # tokens still to generate, at most max_tokens per request
    max_running: int = 0  # the engine's batch limit (max_num_seqs); 0: unknown
    step_s: float = 0.0  # mean engine step time
    batch: float = 0.0  # mean tokens generated per step (the decode batch)
    tokens_per_s: float = 0.0
    prefix_cache_queries: int = 0  # since start, vLLM's prefix-cache counters
    prefix_cache_hits: int = 0


@dataclass(frozen=True)
class EncoderLoad:
    """An encoder replica's routing stats, read by the encoder router."""

    measured_at: float
    pending_images: int = 0  # asked for and not yet encoded (batched, or waiting for a batch)
    images_per_s: float = 0.0  # encoded per second while encoding, over a sliding window
    # Short prefixes of the content hashes in its embedding cache, most recently used last.
    held_images: tuple[str, ...] = ()
