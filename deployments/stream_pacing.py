"""How often one request's generated tokens leave the decoder (`streaming`).

Every chunk a decoder yields crosses three hops (decoder -> ingress -> proxy
-> client), each a Ray message with a fixed cost, so the tokens of several
engine steps go out together, and the more requests a decoder replica serves,
the more steps go into one chunk. Only the time between chunks is paced: the
first chunk (TTFT) and the last (end of the stream) are never held.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol, Self, TypeVar

from serve.config import StreamingConfig


class EngineOutput(Protocol):
    """What pacing needs of vLLM's `RequestOutput` (delta outputs)."""

    finished: bool

    def add(self, next_output: Self, aggregate: bool) -> None: ...


Output = TypeVar("Output", bound=EngineOutput)


def chunk_interval_s(requests_in_replica: int, streaming: StreamingConfig) -> float:
    """Least time between two chunks of one request, with this many requests in the replica.

    The replica's requests share `streaming.max_chunks_per_s`, within
    [`interval_ms`, `max_interval_ms`]: one request alone streams as finely as
    `interval_ms` allows, and a busy replica sends fewer, larger chunks.
    """
    interval_ms = streaming.interval_ms
    if streaming.max_chunks_per_s is not None:
        budget_ms = 1000 * requests_in_replica / streaming.max_chunks_per_s
        interval_ms = min(max(interval_ms, budget_ms), streaming.max_interval_ms)
    return interval_ms / 1000


async def paced(
    outputs: AsyncIterator[Output],
    interval_s: Callable[[], float],
    clock: Callable[[], float] = time.monotonic,
) -> AsyncIterator[Output]:
    """The engine's outputs, merged so that two chunks are at least `interval_s()` apart.

    Outputs that arrive before the interval is up are merged into one
    (`RequestOutput.add`, as vLLM merges deltas for a slow reader) and go out
    with the first output after it, or at once when it finishes the request.
    The interval is asked for after each chunk, so it follows the replica's load.
    """
    held: Output | None = None
    next_send = -math.inf
    async for output in outputs:
        if held is None:
            held = output
        else:
            held.add(output, aggregate=True)
        now = clock()
        if held.finished or now >= next_send:
            yield held
            held, next_send = None, now + interval_s()
    if held is not None:
        yield held
