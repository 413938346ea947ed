"""The decoder's chunk stream as the ingress consumes it (serve/streams.py): started, so that what
fails before the first chunk fails before the HTTP response starts (a streaming client gets a real
429/503/504), and cancelled at the request's deadline with a 504."""

from __future__ import annotations

import asyncio

import pytest
from ray.serve.exceptions import RequestCancelledError

from serve.errors import APIError, RequestTimeout, ServiceUnavailable, TooManyRequests
from serve.streams import started, until_deadline

# A test's own bound on anything it awaits: a broken deadline fails the test instead of hanging it.
GUARD_S = 5.0


def run(coroutine):
    async def guarded():
        async with asyncio.timeout(GUARD_S):
            return await coroutine

    return asyncio.run(guarded())


class Chunks:
    """An async generator's record: how many items were taken from it, and whether it was closed."""

    def __init__(self, items, fail_first: Exception | None = None):
        self.items = items
        self.fail_first = fail_first
        self.taken = 0

    async def stream(self):
        if self.fail_first is not None:
            raise self.fail_first
        for item in self.items:
            self.taken += 1
            yield item


async def collect(chunks) -> list:
    return [chunk async for chunk in chunks]


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (TooManyRequests("the decoder's queue is full", retry_after_s=3), 429),
        (ServiceUnavailable("the decoder is down"), 503),
        (RequestTimeout("past the limit", code="request_timeout"), 504),
    ],
)
def test_a_stream_that_fails_before_its_first_chunk_fails_when_started(error, status):
    chunks = Chunks(["never"], fail_first=error)

    async def start():
        await started(chunks.stream())
        pytest.fail("started() returned a stream whose first chunk had failed")

    with pytest.raises(APIError) as raised:
        run(start())
    assert raised.value is error and raised.value.status_code == status


def test_a_started_stream_has_its_first_chunk_in_hand_and_yields_every_chunk():
    chunks = Chunks(["a", "b", "c"])

    async def start_then_read():
        stream = await started(chunks.stream())
        # Received before the response starts, and only the first.
        assert chunks.taken == 1
        return await collect(stream)

    assert run(start_then_read()) == ["a", "b", "c"]
    assert chunks.taken == 3


def test_a_stream_that_fails_after_its_first_chunk_fails_while_read():
    async def late_failure():
        yield "a"
        raise ServiceUnavailable("the decoder replica died")

    async def start_then_read():
        stream = await started(late_failure())
        received = []
        with pytest.raises(ServiceUnavailable):
            async for chunk in stream:
                received.append(chunk)
        return received

    assert run(start_then_read()) == ["a"]


def test_an_empty_stream_starts_and_yields_nothing():
    async def start_then_read():
        return await collect(await started(Chunks([]).stream()))

    assert run(start_then_read()) == []


class FakeDecoderStream:
    """A stand-in for Serve's DeploymentResponseGenerator: yields `chunks`, then waits for more
    until cancelled, when its pending read raises RequestCancelledError, as Serve's does."""

    def __init__(self, chunks, then_wait: bool = True):
        self.chunks = list(chunks)
        self.then_wait = then_wait
        self.cancelled = False
        self._more: asyncio.Future | None = None

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.chunks:
            return self.chunks.pop(0)
        if not self.then_wait:
            raise StopAsyncIteration
        self._more = asyncio.get_running_loop().create_future()
        try:
            return await self._more
        except asyncio.CancelledError:
            if self.cancelled:
                raise RequestCancelledError("r") from None
            raise

    def cancel(self):
        self.cancelled = True
        if self._more is not None:
            self._more.cancel()


def test_a_stream_past_its_deadline_is_cancelled_and_ends_in_a_request_timeout():
    stream = FakeDecoderStream(["a", "b"])
    received = []

    async def read():
        async for chunk in until_deadline(stream, timeout_s=0.05):
            received.append(chunk)

    with pytest.raises(RequestTimeout) as raised:
        run(read())
    assert received == ["a", "b"]
    # The engine request is aborted: the stream is cancelled, not just no longer read.
    assert stream.cancelled
    assert raised.value.status_code == 504 and raised.value.code == "request_timeout"
    assert "limits.request_timeout_s" in raised.value.message


def test_a_stream_within_its_deadline_is_read_whole_and_never_cancelled():
    stream = FakeDecoderStream(["a", "b", "c"], then_wait=False)

    async def read_then_outlive_the_deadline():
        chunks = await collect(until_deadline(stream, timeout_s=0.05))
        await asyncio.sleep(0.1)
        return chunks

    assert run(read_then_outlive_the_deadline()) == ["a", "b", "c"]
    assert not stream.cancelled


def test_a_failure_before_the_deadline_is_not_called_a_timeout():
    class FailingStream(FakeDecoderStream):
        async def __anext__(self):
            raise ServiceUnavailable("the decoder replica died")

    stream = FailingStream([])

    async def read():
        await collect(until_deadline(stream, timeout_s=10))

    with pytest.raises(ServiceUnavailable):
        run(read())
    assert not stream.cancelled
