"""Completions (raw prompts): the decoder's chunks as one OpenAI response, or as server-sent events."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from serve.chat import sse
from serve.messages import DecodeChunk, DecodeRequest, PositionLogprobs
from serve.protocol.common import Usage
from serve.protocol.completions import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)


def legacy_logprobs(
    positions: list[PositionLogprobs | None], top: int, start_offset: int = 0
) -> CompletionLogprobs:
    """OpenAI's completions format: parallel lists; a prompt's first position has no logprob."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = start_offset
    for position in positions:
        offsets.append(offset)
        if position is None:
            tokens.append("")
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        tokens.append(position.chosen.token)
        token_logprobs.append(position.chosen.logprob)
        top_logprobs.append({t.token: t.logprob for t in position.top[:top]})
        offset += len(position.chosen.token)
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top_logprobs, text_offset=offsets
    )


@dataclass
class CompletionOutput:
    request: CompletionRequest
    decode: DecodeRequest
    model: str
    system_fingerprint: str
    prompt_text: str  # returned in front of the completion with `echo`
    created: int = field(default_factory=lambda: int(time.time()))

    def usage(self, completion_tokens: int) -> Usage:
        prompt_tokens = len(self.decode.prompt_token_ids)
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )

    async def response(self, chunks: AsyncIterator[DecodeChunk]) -> CompletionResponse:
        n = self.request.n
        texts = {i: [self.prompt_text if self.request.echo else ""] for i in range(n)}
        token_ids: dict[int, list[int]] = {i: [] for i in range(n)}
        positions: dict[int, list[PositionLogprobs | None]] = {i: [] for i in range(n)}
        finish: dict[int, str | None] = dict.fromkeys(range(n))
        async for chunk in chunks:
            if chunk.prompt_logprobs is not None:
                for i in range(n):
                    positions[i][:0] = chunk.prompt_logprobs
            for delta in chunk.choices:
                texts[delta.index].append(delta.text)
                token_ids[delta.index].extend(delta.token_ids)
                positions[delta.index].extend(delta.logprobs or [])
                finish[delta.index] = delta.finish_reason or finish[delta.index]
        with_ids = self.request.return_token_ids
        return CompletionResponse(
            id=self.decode.request_id,
            created=self.created,
            model=self.model,
            system_fingerprint=self.system_fingerprint,
            choices=[
                CompletionChoice(
                    index=i,
                    text="".join(texts[i]),
                    finish_reason=finish[i],
                    logprobs=self._logprobs(positions[i]),
                    token_ids=token_ids[i] if with_ids else None,
                )
                for i in range(n)
            ],
            usage=self.usage(sum(len(ids) for ids in token_ids.values())),
            prompt_token_ids=self.decode.prompt_token_ids if with_ids else None,
        )

    async def events(self, chunks: AsyncIterator[DecodeChunk]) -> AsyncIterator[str]:
        completion_tokens = 0
        offsets = dict.fromkeys(range(self.request.n), 0)
        echo_pending = self.request.echo
        async for chunk in chunks:
            if echo_pending:
                # The prompt's logprobs, when asked for, come with the first chunk.
                echoed = [
                    CompletionChoice(
                        index=i,
                        text=self.prompt_text,
                        finish_reason=None,
                        logprobs=self._logprobs(chunk.prompt_logprobs or []),
                    )
                    for i in offsets
                ]
                yield self._event(echoed)
                offsets = dict.fromkeys(offsets, len(self.prompt_text))
                echo_pending = False
            completion_tokens += sum(len(delta.token_ids) for delta in chunk.choices)
            if chunk.choices:
                yield self._event(self._choices(chunk, offsets))
        if self.request.include_usage_in_stream:
            yield self._event([], usage=self.usage(completion_tokens))
        yield sse("[DONE]")

    def _choices(self, chunk: DecodeChunk, offsets: dict[int, int]) -> list[CompletionChoice]:
        choices = []
        for delta in chunk.choices:
            choices.append(
                CompletionChoice(
                    index=delta.index,
                    text=delta.text,
                    finish_reason=delta.finish_reason,
                    logprobs=self._logprobs(delta.logprobs or [], offsets[delta.index]),
                    token_ids=delta.token_ids if self.request.return_token_ids else None,
                )
            )
            offsets[delta.index] += len(delta.text)
        return choices

    def _logprobs(
        self, positions: list[PositionLogprobs | None], offset: int = 0
    ) -> CompletionLogprobs | None:
        if self.request.logprobs is None:
            return None
        return legacy_logprobs(positions, self.request.logprobs, offset)

    def _event(self, choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        chunk = CompletionResponse(
            id=self.decode.request_id,
            created=self.created,
            model=self.model,
            system_fingerprint=self.system_fingerprint,
            choices=choices,
            usage=usage,
        )
        return sse(chunk.model_dump_json(exclude_none=True))
