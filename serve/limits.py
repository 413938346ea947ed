"""Request limits (`limits` in the config): what one request may ask for.

Pure checks on a validated request, run by the ingress before any work is
queued. Each refusal names the request field and the setting it ran into,
so that the client knows what to change and the operator what to raise.
The body size is enforced while the body is read (`read_body`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from serve.config import LimitsConfig
from serve.errors import BadRequest, RequestTooLarge
from serve.protocol.chat import ChatCompletionRequest
from serve.protocol.common import SamplingFields


async def read_body(declared_length: str | None, chunks: AsyncIterator[bytes], max_bytes: int) -> bytes:
    """The request body, refused as soon as it is known to exceed `max_bytes`."""
    if declared_length is not None and declared_length.isdigit() and int(declared_length) > max_bytes:
        raise _too_large(f"is {declared_length} bytes", max_bytes)
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > max_bytes:
            raise _too_large(f"exceeds {max_bytes} bytes", max_bytes)
    return bytes(body)


def _too_large(what: str, max_bytes: int) -> RequestTooLarge:
    return RequestTooLarge(
        f"the request body {what}; the limit is {max_bytes} bytes (limits.max_request_bytes)",
        code="request_too_large",
    )


# Lists of token ids a body may carry (completions' prompt, /detokenize's tokens).
TOKEN_LIST_FIELDS = ("prompt", "tokens")


class _TokenLists(msgspec.Struct):
    """A body's token lists left unparsed: msgspec skips over a raw value ten times faster than
    it builds one."""

    prompt: msgspec.Raw = msgspec.Raw(b"null")
    tokens: msgspec.Raw = msgspec.Raw(b"null")


def check_json_values(raw: bytes, limits: LimitsConfig, max_model_len: int | None) -> None:
    """Raise BadRequest for a body of more JSON values than limits.max_json_values, before it is
    parsed: parsing holds the GIL, so a body of 5,000,000 token ids held every stream of the
    replica for a fifth of a second even off the event loop. A count of separators and openers
    bounds the values from above without parsing anything."""
    # Each value takes at least two bytes (itself and a separator): a short body cannot be over.
    if len(raw) // 2 < limits.max_json_values:
        return
    bound = raw.count(b",") + raw.count(b"[") + raw.count(b"{")
    if bound <= limits.max_json_values:
        return
    if max_model_len is not None:
        _check_token_list_lengths(raw, max_model_len)
    raise BadRequest(
        f"the request body holds up to {bound} JSON values; this service accepts at most "
        f"{limits.max_json_values} (limits.max_json_values)",
        code="limit_exceeded",
    )


def _check_token_list_lengths(raw: bytes, max_model_len: int) -> None:
    """A token list past the context, named as such, counted without being parsed."""
    try:
        lists = msgspec.json.decode(raw, type=_TokenLists)
    except msgspec.MsgspecError:
        return
    for field in TOKEN_LIST_FIELDS:
        value = bytes(getattr(lists, field)).strip()
        # In a list of integers, each comma separates two ids.
        if value.startswith(b"[") and value.count(b",") + 1 > max_model_len:
            raise _past_the_context(field, value.count(b",") + 1, max_model_len)


def _past_the_context(field: str, tokens: int, max_model_len: int) -> BadRequest:
    return BadRequest(
        f"{field}: {tokens} tokens, but this model's maximum context length is {max_model_len} tokens",
        param=field,
        code="context_length_exceeded",
    )


def check_collection_sizes(payload: dict[str, Any], limits: LimitsConfig, max_model_len: int | None) -> None:
    """Raise BadRequest for a collection of a decoded body past its limit, before validation.

    Counting is all this needs, and it is cheap; validating a list of 5,000,000 token ids or
    messages first would hold the event loop and the replica's memory for seconds. Types are
    left to validation: a field of the wrong type is not counted here."""
    messages = payload.get("messages")
    if isinstance(messages, list):
        _at_most(len(messages), limits.max_messages, "messages", "max_messages", "messages")
        parts = sum(
            len(m["content"]) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
        )
        _at_most(parts, limits.max_content_parts, "messages", "max_content_parts", "content parts")
    for field, limit, setting, unit in (
        ("tools", limits.max_tools, "max_tools", "tools"),
        ("logit_bias", limits.max_logit_bias, "max_logit_bias", "entries"),
        ("stop", limits.max_stop_sequences, "max_stop_sequences", "stop sequences"),
    ):
        value = payload.get(field)
        if isinstance(value, (list, dict)):
            _at_most(len(value), limit, field, setting, unit)
    for field in TOKEN_LIST_FIELDS:
        tokens = payload.get(field)
        if max_model_len is not None and isinstance(tokens, list) and len(tokens) > max_model_len:
            raise _past_the_context(field, len(tokens), max_model_len)


def check_limits(request: SamplingFields, limits: LimitsConfig) -> None:
    """Raise BadRequest naming the first field of `request` beyond `limits` (its collections'
    sizes were checked before validation, by `check_collection_sizes`)."""
    _at_most(request.n, limits.max_choices, "n", "max_choices", "choices")
    for i, stop in enumerate(request.stop_sequences):
        param = "stop" if isinstance(request.stop, str) else f"stop[{i}]"
        _at_most(len(stop), limits.max_stop_sequence_chars, param, "max_stop_sequence_chars", "characters")
    if isinstance(request, ChatCompletionRequest):
        _check_schemas(request, limits)


def _check_schemas(request: ChatCompletionRequest, limits: LimitsConfig) -> None:
    for i, tool in enumerate(request.tools or []):
        if tool.function.parameters is not None:
            check_schema(tool.function.parameters, f"tools[{i}].function.parameters", limits)
    response_format = request.response_format
    if response_format is not None and response_format.json_schema is not None:
        check_schema(response_format.json_schema.json_schema, "response_format.json_schema.schema", limits)


def check_schema(schema: dict[str, Any], param: str, limits: LimitsConfig) -> None:
    """A JSON Schema's size and nesting, before anything compiles it into a grammar."""
    size = len(json.dumps(schema, separators=(",", ":")))
    _at_most(size, limits.max_schema_bytes, param, "max_schema_bytes", "bytes as compact JSON")
    _at_most(nesting_depth(schema), limits.max_schema_depth, param, "max_schema_depth", "levels deep")


def nesting_depth(value: Any) -> int:
    """Levels of objects and arrays in a JSON value (iterative: the value may be hostile)."""
    deepest = 0
    pending = [(value, 1)]
    while pending:
        node, depth = pending.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        pending.extend((child, depth + 1) for child in children)
    return deepest


def _at_most(count: int, limit: int, param: str, setting: str, unit: str) -> None:
    if count > limit:
        raise BadRequest(
            f"{param}: {count} {unit}; this service accepts at most {limit} (limits.{setting})",
            param=param,
            code="limit_exceeded",
        )
