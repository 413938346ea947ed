"""The stand-in decoder's engine (deployments/batching_stand_in.py): batching timed by a cost model."""

from __future__ import annotations

import asyncio
import time

import pytest

from deployments.batching_stand_in import BatchingCostModel, BatchingEngine

FAST = BatchingCostModel(step_s=0.004, per_sequence_s=0.001, per_prefill_token_s=0.0, max_num_seqs=4)


async def drain(engine: BatchingEngine, prompt: list[int], max_tokens: int) -> int:
    return sum([made async for made in engine.generate(prompt, max_tokens)])


def test_step_time_grows_with_the_batch_and_the_prefill_and_shrinks_with_speed():
    cost = BatchingCostModel(step_s=0.03, per_sequence_s=0.002, per_prefill_token_s=0.0001)
    assert cost.step_time_s(1, 0, 1.0) < cost.step_time_s(16, 0, 1.0) < cost.step_time_s(16, 1000, 1.0)
    assert cost.step_time_s(8, 100, 0.5) == pytest.approx(2 * cost.step_time_s(8, 100, 1.0))


def test_every_request_gets_its_tokens_and_at_most_max_num_seqs_run_at_once():
    async def scenario():
        engine = BatchingEngine(FAST, speed=1.0)
        tasks = [asyncio.create_task(drain(engine, [i] * 10, 5)) for i in range(6)]
        await asyncio.sleep(0.002)
        load = engine.load(time.time())
        made = await asyncio.gather(*tasks)
        return load, made, engine.load(time.time())

    during, made, after = asyncio.run(scenario())
    assert made == [5] * 6
    assert (during.running, during.waiting, during.max_running) == (4, 2, 4)
    assert during.decode_tokens_pending == 30
    assert (after.running, after.waiting, after.decode_tokens_pending) == (0, 0, 0)
    assert after.step_s > 0 and 1 <= after.batch <= 4


def test_half_speed_takes_about_twice_as_long():
    async def timed(speed: float) -> float:
        engine = BatchingEngine(FAST, speed=speed)
        started = time.monotonic()
        await asyncio.gather(*(drain(engine, [1], 20) for _ in range(2)))
        return time.monotonic() - started

    full, half = asyncio.run(timed(1.0)), asyncio.run(timed(0.5))
    assert 1.6 < half / full < 2.6


def test_a_repeated_prefix_is_found_in_the_prefix_cache():
    async def scenario():
        engine = BatchingEngine(
            BatchingCostModel(step_s=0.001, per_sequence_s=0.0, prefix_block_tokens=64), 1.0
        )
        conversation = list(range(200))
        await drain(engine, conversation, 1)
        first = engine.load(time.time())
        await drain(engine, [*conversation, 7, 8, 9], 1)
        return first, engine.load(time.time())

    first, second = asyncio.run(scenario())
    assert (first.prefix_cache_queries, first.prefix_cache_hits) == (200, 0)
    # The second prompt's three full blocks (192 tokens) were the first prompt's.
    assert (second.prefix_cache_queries, second.prefix_cache_hits) == (403, 192)


def test_a_request_left_early_leaves_the_batch():
    async def scenario():
        engine = BatchingEngine(FAST, speed=1.0)
        stream = engine.generate([1], 1000)
        await anext(stream)
        await stream.aclose()
        await asyncio.sleep(0.02)
        return engine.load(time.time())

    assert asyncio.run(scenario()).running == 0


def test_waiting_requests_start_by_priority_and_each_is_charged_its_share_of_every_step():
    cost = BatchingCostModel(step_s=0.004, per_sequence_s=0.001, per_prefill_token_s=0.0001, max_num_seqs=1)
    charged: dict[str, float] = {}
    finished: list[str] = []

    async def request(engine: BatchingEngine, name: str, prompt_tokens: int, priority: int) -> None:
        def charge(seconds: float) -> None:
            charged[name] = charged.get(name, 0.0) + seconds

        prompt = [len(name) * 1000 + i for i in range(prompt_tokens)]
        async for _ in engine.generate(prompt, 3, priority, charge):
            pass
        finished.append(name)

    async def scenario():
        engine = BatchingEngine(cost, speed=1.0)
        tasks = [asyncio.create_task(request(engine, "first", 10, 2))]
        await asyncio.sleep(0)
        for name, rank in (("low", 2), ("high", 0)):
            tasks.append(asyncio.create_task(request(engine, name, 100, rank)))
        await asyncio.gather(*tasks)
        engine.close()

    asyncio.run(scenario())
    # One slot: the first runs, then high overtakes low, which came before it.
    assert finished == ["first", "high", "low"]
    # Alone in its batch, each is charged three steps, and its own prompt's prefill once.
    assert charged["first"] == pytest.approx(3 * 0.005 + 10 * 0.0001)
    assert charged["high"] == pytest.approx(3 * 0.005 + 100 * 0.0001)
