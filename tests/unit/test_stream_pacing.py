"""Stream pacing (deployments.stream_pacing) on vLLM's own `RequestOutput` deltas.

The engine is replaced by a list of outputs with the times they arrive at,
read by a fake clock; the merging is vLLM's (`RequestOutput.add`). The chunk
budget (`chunk_interval_s`) is checked against the arithmetic its config
fields document.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

import pytest
from pydantic import ValidationError
from vllm.outputs import CompletionOutput, RequestOutput

from deployments.stream_pacing import chunk_interval_s, paced
from serve.config import StreamingConfig


def delta(text: str, token_id: int, *, index: int = 0, finished: bool = False) -> RequestOutput:
    completion = CompletionOutput(
        index=index,
        text=text,
        token_ids=[token_id],
        cumulative_logprob=None,
        logprobs=None,
        finish_reason="length" if finished else None,
    )
    return RequestOutput("r", None, [1, 2], None, [completion], finished)


def run(
    arrivals: list[tuple[float, RequestOutput]], interval_s: float | Callable[[], float]
) -> list[tuple[float, RequestOutput]]:
    """Chunks as (time sent, merged output) for outputs arriving at the given times."""
    interval = interval_s if callable(interval_s) else lambda: interval_s
    now = 0.0

    async def engine():
        nonlocal now
        for at, output in arrivals:
            now = at
            yield output
        # The stream closes a while after its last output: pacing must not wait for that.
        now += 1.0

    async def collect():
        return [(now, chunk) async for chunk in paced(engine(), interval, clock=lambda: now)]

    return asyncio.run(collect())


def texts(chunks) -> list[str]:
    return [chunk.outputs[0].text for _, chunk in chunks]


def steady_stream(num_tokens: int, step_s: float) -> list[tuple[float, RequestOutput]]:
    """One token per engine step; the last one finishes the request."""
    return [
        ((i + 1) * step_s, delta(f"t{i} ", 100 + i, finished=i == num_tokens - 1)) for i in range(num_tokens)
    ]


def test_first_output_goes_out_at_once_and_later_ones_are_merged_per_interval():
    chunks = run(steady_stream(10, step_s=0.01), interval_s=0.035)
    sent_at = [round(at, 3) for at, _ in chunks]
    # First at its arrival, then the first output at or after each interval.
    assert sent_at[:3] == [0.01, 0.05, 0.09]
    assert texts(chunks)[:3] == ["t0 ", "t1 t2 t3 t4 ", "t5 t6 t7 t8 "]
    # All but the finishing chunk keep the interval.
    assert all(later - earlier >= 0.035 for earlier, later in itertools.pairwise(sent_at[:-1]))


def test_the_finishing_output_is_never_held():
    chunks = run(steady_stream(10, step_s=0.01), interval_s=0.035)
    last_at, last = chunks[-1]
    # Arrived 10 ms after the chunk before it, well inside the interval.
    assert round(last_at, 3) == 0.10 and last.finished
    assert last.outputs[0].text == "t9 " and last.outputs[0].finish_reason == "length"


@pytest.mark.parametrize("interval_s", [0.0, 0.005, 0.02, 0.05, 1.0])
def test_every_token_arrives_once_and_in_order(interval_s):
    chunks = run(steady_stream(25, step_s=0.01), interval_s)
    assert "".join(texts(chunks)) == "".join(f"t{i} " for i in range(25))
    assert [t for _, chunk in chunks for t in chunk.outputs[0].token_ids] == list(range(100, 125))
    assert [chunk.finished for _, chunk in chunks].count(True) == 1 and chunks[-1][1].finished


def test_interval_zero_sends_every_engine_step():
    assert len(run(steady_stream(12, step_s=0.01), interval_s=0.0)) == 12


def test_choices_of_one_request_are_merged_by_index():
    arrivals = [
        (0.00, delta("a", 1, index=0)),
        (0.01, delta("b", 2, index=1)),
        (0.02, delta("c", 3, index=0)),
        (0.03, delta("d", 4, index=1, finished=True)),
    ]
    chunks = run(arrivals, interval_s=1.0)
    assert len(chunks) == 2
    merged = {completion.index: completion for completion in chunks[1][1].outputs}
    assert (merged[0].text, list(merged[0].token_ids)) == ("c", [3])
    assert (merged[1].text, list(merged[1].token_ids)) == ("bd", [2, 4])


def test_a_stream_that_ends_unfinished_still_delivers_what_it_held():
    arrivals = [(0.0, delta("a", 1)), (0.01, delta("b", 2)), (0.02, delta("c", 3))]
    chunks = run(arrivals, interval_s=1.0)
    assert texts(chunks) == ["a", "bc"]
    assert chunks[-1][0] == pytest.approx(1.02)


def test_the_interval_is_asked_for_after_each_chunk():
    # The replica gets busier while the request runs: 15 ms, then 55 ms.
    intervals = itertools.chain([0.015, 0.015], itertools.repeat(0.055))
    chunks = run(steady_stream(20, step_s=0.01), interval_s=lambda: next(intervals))
    sent_at = [round(at, 3) for at, _ in chunks]
    assert sent_at[:5] == [0.01, 0.03, 0.05, 0.11, 0.17]
    assert "".join(texts(chunks)) == "".join(f"t{i} " for i in range(20))


BUDGET = StreamingConfig(interval_ms=50, max_chunks_per_s=160, max_interval_ms=200)


@pytest.mark.parametrize("requests_in_replica", [0, 1, 2, 8])
def test_a_lightly_loaded_replica_streams_at_the_least_interval(requests_in_replica):
    # 8 requests x one chunk per 50 ms = 160 chunks/s: within the budget.
    assert chunk_interval_s(requests_in_replica, BUDGET) == pytest.approx(0.050)


@pytest.mark.parametrize("requests_in_replica", [12, 16, 24, 32])
def test_a_busy_replica_shares_its_chunk_budget_among_its_requests(requests_in_replica):
    interval_s = chunk_interval_s(requests_in_replica, BUDGET)
    assert 0.050 < interval_s <= 0.200
    assert requests_in_replica / interval_s == pytest.approx(BUDGET.max_chunks_per_s)


@pytest.mark.parametrize("requests_in_replica", [33, 64, 1000])
def test_the_budget_never_widens_the_interval_past_its_maximum(requests_in_replica):
    assert chunk_interval_s(requests_in_replica, BUDGET) == pytest.approx(0.200)


def test_without_a_budget_every_request_keeps_the_least_interval():
    fixed = StreamingConfig(interval_ms=30, max_chunks_per_s=None)
    assert [chunk_interval_s(n, fixed) for n in (1, 32, 1000)] == pytest.approx([0.030] * 3)


def test_a_maximum_below_the_least_interval_is_refused_by_name():
    with pytest.raises(ValidationError, match=r"streaming\.max_interval_ms"):
        StreamingConfig(interval_ms=100, max_interval_ms=50)


# The defaults as README.md and docs/benchmarks.md state them: 80 chunks per second per decoder
# replica, shared by its requests, none closer than 50 ms nor further than 200 ms apart. Up to
# 4 requests keep 50 ms, 8 get 100 ms, 16 and more every 200 ms; in between, N / 80 s.
@pytest.mark.parametrize(
    ("requests_in_replica", "interval_ms"),
    [(0, 50), (1, 50), (2, 50), (4, 50), (6, 75), (8, 100), (12, 150), (16, 200), (32, 200), (500, 200)],
)
def test_the_default_budget_is_the_documented_one(requests_in_replica, interval_ms):
    assert chunk_interval_s(requests_in_replica, StreamingConfig()) == pytest.approx(interval_ms / 1000)
