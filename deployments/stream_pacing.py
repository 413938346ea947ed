"""How often one request's generated tokens leave the decoder (`streaming.interval_ms`).

Every chunk a decoder yields crosses three hops (decoder -> ingress -> proxy
-> client), each a Ray message with a fixed cost, so under load the tokens of
several engine steps go out together. Only the time between chunks is paced:
the first chunk (TTFT) and the last (end of the stream) are never held.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol, Self, TypeVar


class EngineOutput(Protocol):
    """What pacing needs of vLLM's `RequestOutput` (delta outputs)."""

    finished: bool

    def add(self, next_output: Self, aggregate: bool) -> None: ...


Output = TypeVar("Output", bound=EngineOutput)


async def paced(
    outputs: AsyncIterator[Output], interval_s: float, clock: Callable[[], float] = time.monotonic
) -> AsyncIterator[Output]:
    """The engine's outputs, merged so that two chunks are at least `interval_s` apart.

    Outputs that arrive before the interval is up are merged into one
    (`RequestOutput.add`, as vLLM merges deltas for a slow reader) and go out
    with the first output after it, or at once when it finishes the request.
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
            held, next_send = None, now + interval_s
    if held is not None:
        yield held
