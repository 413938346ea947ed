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


def check_limits(request: SamplingFields, limits: LimitsConfig) -> None:
    """Raise BadRequest naming the first field of `request` beyond `limits`."""
    _at_most(request.n, limits.max_choices, "n", "max_choices", "choices")
    stops = request.stop_sequences
    _at_most(len(stops), limits.max_stop_sequences, "stop", "max_stop_sequences", "stop sequences")
    for i, stop in enumerate(stops):
        param = "stop" if isinstance(request.stop, str) else f"stop[{i}]"
        _at_most(len(stop), limits.max_stop_sequence_chars, param, "max_stop_sequence_chars", "characters")
    _at_most(len(request.logit_bias or {}), limits.max_logit_bias, "logit_bias", "max_logit_bias", "entries")
    if isinstance(request, ChatCompletionRequest):
        _check_chat(request, limits)


def _check_chat(request: ChatCompletionRequest, limits: LimitsConfig) -> None:
    _at_most(len(request.messages), limits.max_messages, "messages", "max_messages", "messages")
    parts = sum(len(m.content) for m in request.messages if isinstance(m.content, list))
    _at_most(parts, limits.max_content_parts, "messages", "max_content_parts", "content parts")
    tools = request.tools or []
    _at_most(len(tools), limits.max_tools, "tools", "max_tools", "tools")
    for i, tool in enumerate(tools):
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
