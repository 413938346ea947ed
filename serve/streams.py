"""The decoder's chunk stream as the ingress consumes it: started, and bounded in time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

from ray.serve.handle import DeploymentResponseGenerator

from serve.errors import RequestTimeout

Chunk = TypeVar("Chunk")


async def started(chunks: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
    """`chunks` with its first item already received.

    Whatever fails before the first token (a full queue, a stage that is
    down, a replica lost on the way) then fails before the HTTP response
    starts, so a streaming client gets a real status code, not a 200 whose
    body is an error event."""
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        first = None
    return _prepended(first, chunks)


async def _prepended(first: Chunk | None, rest: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
    if first is None:
        return
    yield first
    async for item in rest:
        yield item


async def until_deadline(stream: DeploymentResponseGenerator, timeout_s: float) -> AsyncIterator[Chunk]:
    """The stream, cancelled (the engine request aborted) once `timeout_s` have passed.

    One timer per request rather than a timeout around each chunk: cheaper,
    and it fires even while the ingress waits on the client, not the decoder."""
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        stream.cancel()

    timer = asyncio.get_running_loop().call_later(timeout_s, expire)
    try:
        async for chunk in stream:
            yield chunk
    except Exception as e:
        if expired:
            raise RequestTimeout(
                f"the request ran past its time limit of {timeout_s:g} s (limits.request_timeout_s) "
                "and was stopped",
                code="request_timeout",
            ) from e
        raise
    finally:
        timer.cancel()
