"""Chat output as OpenAI wants it: content, reasoning and tool calls split out of the model's text.

The splitting is vLLM's own Mistral parser (`vllm.parser.mistral.MistralParser`,
the parser vLLM's OpenAI server uses for `[THINK]...[/THINK]` and
`[TOOL_CALLS]name[ARGS]{...}`), fed one streamed delta at a time. Logprobs get
their exact token bytes from the tokenizer (tekken), not from re-encoding the
decoded text, which is wrong for pieces of multi-byte characters.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

from serve.messages import OutputParsing, PositionLogprobs, TokenLogprob, ToolCallDelta


def _cache_special_token_lexer() -> None:
    """Build vLLM's special-token lexer once per tokenizer instead of once per parser.

    `StreamingParserEngine.__init__` compiles a regex for each of tekken's 1000
    special-token slots, about 40 ms of CPU for every parser, that is, for
    every chat completion that is parsed. The result depends only on the
    parser config and the tokenizer, both long-lived, so it is safe to reuse.
    """
    import vllm.parser.engine.streaming_parser_engine as engine

    build = engine._build_drop_info
    if getattr(build, "is_cached_by_ministral_serve", False):
        return
    # Keyed by identity; the entry keeps both objects alive so ids stay unique.
    cache: dict[tuple[int, int], tuple] = {}

    @functools.wraps(build)
    def cached(config, tokenizer):
        key = (id(config), id(tokenizer))
        if key not in cache:
            cache[key] = (config, tokenizer, build(config, tokenizer))
        return cache[key][2]

    cached.is_cached_by_ministral_serve = True
    engine._build_drop_info = cached


class ChoiceParser:
    """Splits one choice's streamed output; one per choice (the parser is stateful)."""

    def __init__(self, tokenizer, parsing: OutputParsing, prompt_token_ids: list[int]):
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionToolsParam
        from vllm.parser.mistral import MistralParser

        _cache_special_token_lexer()
        tools = None
        if parsing.tools:
            tools = [
                ChatCompletionToolsParam(
                    type="function", function={"name": tool.name, "parameters": tool.parameters}
                )
                for tool in parsing.tools
            ]
        self._offers_tools = bool(tools)
        self._request = SimpleNamespace(tools=tools, tool_choice="auto", include_reasoning=parsing.reasoning)
        self._parser = MistralParser(tokenizer, tools)
        self._prompt_token_ids = prompt_token_ids
        self._token_ids: list[int] = []

    def feed(self, text: str, token_ids: list[int], finished: bool) -> tuple[str, str, list[ToolCallDelta]]:
        """(content, reasoning, tool-call deltas) of one streamed delta."""
        self._token_ids.extend(token_ids)
        delta = self._parser.parse_delta(
            text, token_ids, self._request, self._prompt_token_ids, finished=finished
        )
        if delta is None:
            return "", "", []
        calls = []
        # A call the client offered no tool for is dropped, as vLLM's server does.
        if self._offers_tools:
            calls = [
                ToolCallDelta(
                    index=call.index,
                    id=call.id,
                    name=call.function.name if call.function else None,
                    arguments=(call.function.arguments or "") if call.function else "",
                )
                for call in delta.tool_calls or []
            ]
        return delta.content or "", delta.reasoning or "", calls

    def reasoning_tokens(self) -> int:
        return self._parser.count_reasoning_tokens(self._token_ids)


def position_logprobs(tokenizer, position: dict, chosen_id: int | None, top: int) -> PositionLogprobs:
    """vLLM's logprobs of one position (dict token id -> Logprob) as typed records."""
    tekken = tokenizer.tokenizer

    def record(token_id: int) -> TokenLogprob:
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

        logprob = position[token_id]
        token = logprob.decoded_token
        if token is None:
            token = tokenizer.decode([token_id])
        return TokenLogprob(
            token_id=token_id,
            token=token,
            token_bytes=tekken.id_to_byte_piece(token_id, SpecialTokenPolicy.KEEP),
            logprob=max(logprob.logprob, -9999.0),
        )

    ranked = sorted(
        (token_id for token_id, logprob in position.items() if logprob.rank is not None),
        key=lambda token_id: position[token_id].rank,
    )
    chosen = chosen_id if chosen_id is not None else ranked[0]
    return PositionLogprobs(chosen=record(chosen), top=[record(token_id) for token_id in ranked[:top]])
