"""Chat completions: the decoder's chunks as one OpenAI response, or as server-sent events.

`ChatOutput` holds what the ingress decided for one request (the prompt it
built, the choices' parsing) and turns the decoder's typed `DecodeChunk`s into
the OpenAI wire format. No Ray and no engine here.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from serve.messages import ChoiceDelta, DecodeChunk, DecodeRequest, PositionLogprobs
from serve.protocol.chat import (
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChoiceLogprobs,
    DeltaMessage,
    FunctionCall,
    FunctionCallDelta,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
)
from serve.protocol.common import CompletionTokensDetails, FinishReason, Usage


def chat_logprobs(positions: list[PositionLogprobs] | None, top: int) -> ChoiceLogprobs | None:
    if positions is None:
        return None

    def entry(token) -> TopLogprob:
        return TopLogprob(token=token.token, logprob=token.logprob, bytes=list(token.token_bytes))

    return ChoiceLogprobs(
        content=[
            TokenLogprob(**entry(p.chosen).model_dump(), top_logprobs=[entry(t) for t in p.top[:top]])
            for p in positions
        ]
    )


def finish_reason(reason: str | None, called_tools: bool) -> FinishReason | None:
    # The model stopped after its calls: OpenAI says so with "tool_calls".
    if reason == "stop" and called_tools:
        return "tool_calls"
    return reason


@dataclass
class ChoiceState:
    """One choice, accumulated over the stream."""

    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: dict[int, list[str]] = field(default_factory=dict)  # index -> [id, name, arguments]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    reasoning_tokens: int = 0

    def text(self) -> str | None:
        """The content; None (not "") when the choice only called tools, as OpenAI answers."""
        text = "".join(self.content)
        return text if text or not self.tool_calls else None

    def calls(self) -> list[ToolCall] | None:
        ordered = (self.tool_calls[index] for index in sorted(self.tool_calls))
        calls = [ToolCall(id=i, function=FunctionCall(name=n, arguments=a)) for i, n, a in ordered]
        return calls or None

    def add(self, delta: ChoiceDelta) -> None:
        self.content.append(delta.text)
        self.reasoning.append(delta.reasoning)
        for call in delta.tool_calls:
            known = self.tool_calls.setdefault(call.index, ["", "", ""])
            known[0] = call.id or known[0]
            known[1] = call.name or known[1]
            known[2] += call.arguments
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs or [])
        self.finish_reason = delta.finish_reason or self.finish_reason
        self.reasoning_tokens = delta.reasoning_tokens or self.reasoning_tokens


@dataclass
class ChatOutput:
    request: ChatCompletionRequest
    decode: DecodeRequest
    model: str
    system_fingerprint: str
    created: int = field(default_factory=lambda: int(time.time()))

    def usage(self, choices: dict[int, ChoiceState]) -> Usage:
        prompt_tokens = len(self.decode.prompt_token_ids)
        completion_tokens = sum(len(state.token_ids) for state in choices.values())
        reasoning_tokens = sum(state.reasoning_tokens for state in choices.values())
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            completion_tokens_details=CompletionTokensDetails(reasoning_tokens=reasoning_tokens)
            if self.decode.parsing and self.decode.parsing.reasoning
            else None,
        )

    async def response(self, chunks: AsyncIterator[DecodeChunk]) -> ChatCompletionResponse:
        choices = {index: ChoiceState() for index in range(self.request.n)}
        async for chunk in chunks:
            for delta in chunk.choices:
                choices[delta.index].add(delta)
        with_ids = self.request.return_token_ids
        return ChatCompletionResponse(
            id=self.decode.request_id,
            created=self.created,
            model=self.model,
            system_fingerprint=self.system_fingerprint,
            choices=[
                ChatCompletionChoice(
                    index=index,
                    message=AssistantMessage(
                        content=state.text(),
                        reasoning_content="".join(state.reasoning) or None,
                        tool_calls=state.calls(),
                    ),
                    finish_reason=finish_reason(state.finish_reason, bool(state.tool_calls)),
                    logprobs=chat_logprobs(state.logprobs if self.request.logprobs else None, self._top()),
                    token_ids=state.token_ids if with_ids else None,
                )
                for index, state in choices.items()
            ],
            usage=self.usage(choices),
            prompt_token_ids=self.decode.prompt_token_ids if with_ids else None,
        )

    async def events(self, chunks: AsyncIterator[DecodeChunk]) -> AsyncIterator[str]:
        """The SSE stream: a role chunk per choice, content/reasoning/tool-call deltas, usage, [DONE]."""
        choices = {index: ChoiceState() for index in range(self.request.n)}
        for index in choices:
            role = ChatCompletionStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=""))
            yield self._event([role], first=index == 0)
        async for chunk in chunks:
            stream_choices = []
            for delta in chunk.choices:
                state = choices[delta.index]
                state.add(delta)
                if not (
                    delta.text or delta.reasoning or delta.tool_calls or delta.finish_reason or delta.logprobs
                ):
                    continue
                stream_choices.append(
                    ChatCompletionStreamChoice(
                        index=delta.index,
                        delta=DeltaMessage(
                            content=delta.text or None,
                            reasoning_content=delta.reasoning or None,
                            tool_calls=[
                                ToolCallDelta(
                                    index=call.index,
                                    id=call.id,
                                    type="function" if call.id else None,
                                    function=FunctionCallDelta(name=call.name, arguments=call.arguments),
                                )
                                for call in delta.tool_calls
                            ]
                            or None,
                        ),
                        finish_reason=finish_reason(delta.finish_reason, bool(state.tool_calls)),
                        logprobs=chat_logprobs(
                            delta.logprobs if self.request.logprobs else None, self._top()
                        ),
                        token_ids=delta.token_ids if self.request.return_token_ids else None,
                    )
                )
            if stream_choices:
                yield self._event(stream_choices)
        if self.request.include_usage_in_stream:
            yield self._event([], usage=self.usage(choices))
        yield sse("[DONE]")

    def _top(self) -> int:
        return self.request.top_logprobs or 0

    def _event(
        self, choices: list[ChatCompletionStreamChoice], usage: Usage | None = None, first=False
    ) -> str:
        chunk = ChatCompletionChunk(
            id=self.decode.request_id,
            created=self.created,
            model=self.model,
            system_fingerprint=self.system_fingerprint,
            choices=choices,
            usage=usage,
            prompt_token_ids=self.decode.prompt_token_ids
            if first and self.request.return_token_ids
            else None,
        )
        return sse(chunk.model_dump_json(exclude_none=True))


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"
