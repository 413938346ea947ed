"""Constrained output: the grammar a chat request's tools and response_format ask for.

The grammars are mistral_common's (`GrammarFactory`: Mistral's own Lark
templates for `[TOOL_CALLS]name[ARGS]{...}`, JSON and `[THINK]`), compiled by
llguidance inside vLLM. What this module adds:

- tool-call arguments always follow the tool's JSON Schema (as OpenAI's
  `strict` tools do), so that `required` and named calls are always valid;
- JSON is compact (no free whitespace, llguidance's `whitespace_flexible:
  false`, and none of the templates' optional padding around it): with
  flexible whitespace a weak or random model fills `max_tokens` with spaces
  inside the JSON and never finishes;
- the `[THINK]` branch only for reasoning checkpoints (`model.reasoning`);
- every schema is compiled before the request reaches the engine, so a bad
  one is a 400 naming the field, not an engine error;
- `CompiledGrammars`: compilation runs off the event loop (llguidance
  releases the GIL), in a small pool so that a flood of schemas cannot take
  every core, and its outcome is kept by what it was compiled from, so a
  client that sends the same tools on every turn compiles them once.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import re
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from serve.byte_budget_lru import ByteBudgetLru
from serve.errors import BadRequest
from serve.protocol.chat import ChatCompletionRequest, NamedToolChoice, ToolDefinition

COMPACT_JSON = {"whitespace_flexible": False}


# Mistral's templates allow up to 8 whitespace characters (SAFE_WS) around
# tool names, arguments and JSON answers. A weak model takes them: tool names
# came back as "\r\r  get_weather", which no client can dispatch.
_PADDING = re.compile(r"[ \t]*SAFE_WS\?|^SAFE_WS:.*$", re.MULTILINE)


def without_padding(grammar: str) -> str:
    """The grammar without the optional whitespace around tool calls and JSON."""
    return _PADDING.sub("", grammar)


class GrammarBuilder:
    def __init__(self, tokenizer, *, reasoning: bool):
        """`tokenizer`: the checkpoint's mistral_common `MistralTokenizer`."""
        from mistral_common.guidance.grammar_factory import JINJA_DIR, GrammarFactory

        self._factory = GrammarFactory(tokenizer)
        # The think template lets the model open a [THINK] block before the
        # constrained part; only reasoning models should.
        self._template = (
            self._factory.select_jinja_template()
            if reasoning
            else (JINJA_DIR / "base_grammar.lark.jinja").read_text(encoding="utf-8")
        )

    def for_chat(self, request: ChatCompletionRequest) -> str | None:
        """The Lark grammar of a chat request, or None when the output is free text."""
        from mistral_common.protocol.instruct.tool_calls import ToolChoiceEnum

        choice = request.effective_tool_choice
        json_schema = self._response_schema(request)
        if json_schema is None and not request.tools:
            return None
        if json_schema is not None and choice not in ("auto", "none"):
            raise BadRequest(
                "response_format: a JSON response_format can be combined with tools only when "
                "tool_choice is auto or none",
                param="response_format",
            )
        offered = list(enumerate(request.tools or []))
        if choice == "none":
            offered = []
        if isinstance(choice, NamedToolChoice):
            offered = [(i, tool) for i, tool in offered if tool.function.name == choice.function.name]
            if not offered:
                names = [tool.function.name for tool in request.tools or []]
                raise BadRequest(
                    f"tool_choice: no tool named {choice.function.name!r}; the tools are {names}",
                    param="tool_choice.function.name",
                )
            mode = ToolChoiceEnum.required
        else:
            mode = ToolChoiceEnum(choice)
        mistral_tools = [self._strict_tool(i, tool) for i, tool in offered]
        grammar = self._factory.get_lark_from_jinja(
            template=self._template,
            mode=mode,
            tools=mistral_tools or None,
            json_schema=json_schema,
            parallel_tool_calls=request.parallel_tool_calls,
            json_only=json_schema is not None and not mistral_tools,
            force_tool_names=True,
        )
        grammar = without_padding(grammar)
        self._check(grammar, "tools" if mistral_tools else "response_format")
        return grammar

    def _response_schema(self, request: ChatCompletionRequest) -> dict[str, Any] | None:
        response_format = request.response_format
        if response_format is None or response_format.type == "text":
            return None
        if response_format.type == "json_object":
            schema: dict[str, Any] = {"type": "object"}
        else:
            schema = copy.deepcopy(response_format.json_schema.json_schema)
            self._check_schema(schema, "response_format.json_schema.schema")
        return {**schema, "x-guidance": COMPACT_JSON}

    def _strict_tool(self, index: int, tool: ToolDefinition):
        from mistral_common.protocol.instruct.tool_calls import Function, Tool

        parameters = copy.deepcopy(tool.function.parameters) or {"type": "object", "properties": {}}
        self._check_schema(parameters, f"tools[{index}].function.parameters")
        return Tool(
            function=Function(
                name=tool.function.name,
                description=tool.function.description or "",
                parameters={**parameters, "x-guidance": COMPACT_JSON},
                strict=True,
            )
        )

    def _check_schema(self, schema: dict[str, Any], param: str) -> None:
        from llguidance import LLMatcher

        try:
            grammar = LLMatcher.grammar_from_json_schema(schema)
        except (ValueError, TypeError) as e:
            raise BadRequest(f"{param}: not a usable JSON Schema: {e}", param=param) from e
        self._check(grammar, param, compiled=True)

    def _check(self, grammar: str, param: str, *, compiled: bool = False) -> None:
        from llguidance import LLMatcher

        if not compiled:
            grammar = LLMatcher.grammar_from_lark(grammar)
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, self._factory.llg_tokenizer)
        if is_error:
            raise BadRequest(f"{param}: cannot be enforced: {messages[0]}", param=param)


# What a chat request's grammar is compiled from.
_GRAMMAR_FIELDS = {"tools", "tool_choice", "response_format", "parallel_tool_calls"}


@dataclass(frozen=True)
class _Refusal:
    """A cached refusal: its words only. The exception itself would keep, through its traceback's
    frames, the request it refused (megabytes of tools)."""

    message: str
    param: str | None
    code: str | None


class CompiledGrammars:
    """`GrammarBuilder.for_chat` off the event loop, its outcomes (grammar or refusal) cached by a
    hash of their input within a byte budget: the input (tools with their descriptions) may be
    megabytes, and a cache bounded by entries could hold gigabytes."""

    def __init__(self, builder: GrammarBuilder, executor: Executor, max_bytes: int):
        self._builder = builder
        self._executor = executor
        self._outcomes: ByteBudgetLru[str | _Refusal] = ByteBudgetLru(max_bytes, size_of=_outcome_bytes)

    async def for_chat(self, request: ChatCompletionRequest) -> str | None:
        response_format = request.response_format
        if not request.tools and (response_format is None or response_format.type == "text"):
            return None
        key = hashlib.blake2b(
            request.model_dump_json(include=_GRAMMAR_FIELDS).encode(), digest_size=16
        ).hexdigest()
        outcome = self._outcomes.get(key)
        if outcome is None:
            outcome = await asyncio.get_running_loop().run_in_executor(self._executor, self._compile, request)
            if outcome is not None:
                self._outcomes.put(key, outcome)
        if isinstance(outcome, _Refusal):
            raise BadRequest(outcome.message, param=outcome.param, code=outcome.code)
        return outcome

    def _compile(self, request: ChatCompletionRequest) -> str | _Refusal | None:
        try:
            return self._builder.for_chat(request)
        except BadRequest as refused:
            return _Refusal(refused.message, refused.param, refused.code)


# What an entry costs besides its text: the key, the entry and the objects around the text.
_ENTRY_OVERHEAD_BYTES = 256


def _outcome_bytes(outcome: str | _Refusal) -> int:
    text = outcome.message if isinstance(outcome, _Refusal) else outcome
    return len(text.encode()) + _ENTRY_OVERHEAD_BYTES
