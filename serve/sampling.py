"""From an OpenAI request's sampling fields to the decoder's `SamplingSettings`.

Shared by chat and completions. Everything here is a client-side check that
can be made before the engine sees the request: a request that cannot fit the
context, or names a token that does not exist, is a 400, never truncated.
"""

from __future__ import annotations

from dataclasses import dataclass

from serve.config import LimitsConfig
from serve.errors import BadRequest
from serve.messages import EngineInfo, SamplingSettings
from serve.protocol.common import SamplingFields


@dataclass(frozen=True)
class ResponseShape:
    """What a request asks the engine and the reply to hold, besides its completion length."""

    choices: int = 1
    # Log-probabilities per token held in the reply (top_logprobs + 1); 0 when none are, as in streams.
    logprobs_per_token: int = 0
    # Prompt tokens whose log-probabilities each choice echoes (completions' echo).
    echoed_prompt_tokens: int = 0


def completion_budget(
    prompt_tokens: int,
    requested: int | None,
    info: EngineInfo,
    limits: LimitsConfig,
    shape: ResponseShape = ResponseShape(),
    *,
    field: str = "max_tokens",
    prompt_field: str = "messages",
) -> int:
    """Tokens each choice may generate; a request that cannot fit is a 400, never truncated.

    Left unset, the budget is the rest of the context within `limits` (default_max_tokens, and
    whatever keeps the whole request within max_total_completion_tokens and
    max_logprob_entries); set, it must fit all of them."""
    context = info.max_model_len
    if prompt_tokens >= context:
        raise BadRequest(
            f"{prompt_field}: the prompt is {prompt_tokens} tokens, but this model's maximum context "
            f"length is {context} tokens",
            param=prompt_field,
            code="context_length_exceeded",
        )
    ceilings = {"max_total_completion_tokens": limits.max_total_completion_tokens // shape.choices}
    if shape.logprobs_per_token:
        echoed = shape.choices * shape.echoed_prompt_tokens * shape.logprobs_per_token
        if echoed > limits.max_logprob_entries:
            raise _over_limit(
                "logprobs",
                f"echoing the prompt's log-probabilities ({echoed})",
                limits.max_logprob_entries,
                "max_logprob_entries",
            )
        room = limits.max_logprob_entries - echoed
        ceilings["max_logprob_entries"] = room // (shape.choices * shape.logprobs_per_token)
    if requested is None:
        default = min(context - prompt_tokens, limits.default_max_tokens or context, *ceilings.values())
        if default < 1:
            raise _over_limit(
                "logprobs", "one token's log-probabilities", limits.max_logprob_entries, "max_logprob_entries"
            )
        return default
    if prompt_tokens + requested > context:
        raise BadRequest(
            f"{field}: this model's maximum context length is {context} tokens; you requested "
            f"{prompt_tokens + requested} ({prompt_tokens} in the prompt, {requested} in the "
            "completion)",
            param=field,
            code="context_length_exceeded",
        )
    for setting, ceiling in ceilings.items():
        if requested > ceiling:
            per_token = (
                f" x {shape.logprobs_per_token} log-probabilities" if setting == "max_logprob_entries" else ""
            )
            raise _over_limit(
                field,
                f"{requested} tokens x {shape.choices} choices{per_token}",
                getattr(limits, setting),
                setting,
            )
    return requested


def _over_limit(param: str, what: str, limit: int, setting: str) -> BadRequest:
    return BadRequest(
        f"{param}: {what} is more than this service allows in one request, {limit} (limits.{setting})",
        param=param,
        code="limit_exceeded",
    )


def check_token_ids(token_ids, info: EngineInfo, param: str) -> None:
    for token_id in token_ids:
        if not 0 <= int(token_id) < info.vocab_size:
            raise BadRequest(
                f"{param}: token id {token_id} is not in the vocabulary (ids 0 to {info.vocab_size - 1})",
                param=param,
            )


def sampling_settings(
    request: SamplingFields,
    *,
    max_tokens: int,
    info: EngineInfo,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    grammar: str | None = None,
) -> SamplingSettings:
    logit_bias = None
    if request.logit_bias:
        check_token_ids(request.logit_bias, info, "logit_bias")
        logit_bias = {int(token_id): bias for token_id, bias in request.logit_bias.items()}
    return SamplingSettings(
        max_tokens=max_tokens,
        n=request.n,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        min_p=request.min_p,
        seed=request.seed,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        logit_bias=logit_bias,
        stop=request.stop_sequences,
        ignore_eos=request.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        grammar=grammar,
    )
