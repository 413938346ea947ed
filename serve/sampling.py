"""From an OpenAI request's sampling fields to the decoder's `SamplingSettings`.

Shared by chat and completions. Everything here is a client-side check that
can be made before the engine sees the request: a request that cannot fit the
context, or names a token that does not exist, is a 400, never truncated.
"""

from __future__ import annotations

from serve.errors import BadRequest
from serve.messages import EngineInfo, SamplingSettings
from serve.protocol.common import SamplingFields


def completion_budget(
    prompt_tokens: int, requested: int | None, info: EngineInfo, *, field: str = "max_tokens"
) -> int:
    """Tokens the completion may use; a request that cannot fit is a 400, never truncated."""
    context = info.max_model_len
    if prompt_tokens >= context:
        raise BadRequest(
            f"messages: the prompt is {prompt_tokens} tokens, but this model's maximum context "
            f"length is {context} tokens",
            param="messages",
            code="context_length_exceeded",
        )
    if requested is None:
        return context - prompt_tokens
    if prompt_tokens + requested > context:
        raise BadRequest(
            f"{field}: this model's maximum context length is {context} tokens; you requested "
            f"{prompt_tokens + requested} ({prompt_tokens} in the prompt, {requested} in the "
            "completion)",
            param=field,
            code="context_length_exceeded",
        )
    return requested


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
