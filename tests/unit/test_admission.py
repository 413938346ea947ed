"""Admission at the ingress (serve/admission.py): priority, weighted fair share by cost, and
deadlines, on hand-built states and an injected clock."""

import asyncio

import pytest

from serve.admission import (
    AdmissionGate,
    AdmissionRefused,
    CostWeights,
    DeadlinePredictor,
    FairQueue,
    request_cost,
)

WEIGHTS = CostWeights(prompt_token_cost=0.1, image_token_cost=0.25)


def test_a_request_costs_its_completion_its_prompt_and_its_images():
    assert request_cost(1000, 0, 50, WEIGHTS) == pytest.approx(150)
    assert request_cost(20, 3000, 50, WEIGHTS) == pytest.approx(50 + 2 + 750)


def served_cost(queue: FairQueue, costs: dict, pops: int) -> dict[str, float]:
    served: dict[str, float] = {}
    for _ in range(pops):
        tenant, cost = costs[queue.pop()]
        served[tenant] = served.get(tenant, 0.0) + cost
    return served


def test_backlogged_tenants_get_cost_in_proportion_to_their_weights_not_requests():
    queue, costs = FairQueue(), {}
    # A heavy tenant with 4x the requests, each 10x the cost (large images), queued first.
    for i in range(400):
        costs[f"heavy{i}"] = ("heavy", 500.0)
        queue.push(f"heavy{i}", "heavy", weight=1.0, rank=1, cost=500.0)
    for i in range(100):
        costs[f"light{i}"] = ("light", 50.0)
        queue.push(f"light{i}", "light", weight=1.0, rank=1, cost=50.0)
    served = served_cost(queue, costs, 110)
    # Equal weights: equal cost served, within one heavy request.
    assert abs(served["heavy"] - served["light"]) <= 500
    # By request count, the light tenant got ten for each of the heavy one's.
    assert served["light"] / 50 >= 9 * served["heavy"] / 500


def test_weights_divide_the_cost_served():
    queue, costs = FairQueue(), {}
    for i in range(300):
        for tenant, weight in (("gold", 3.0), ("bronze", 1.0)):
            costs[f"{tenant}{i}"] = (tenant, 10.0)
            queue.push(f"{tenant}{i}", tenant, weight=weight, rank=1, cost=10.0)
    served = served_cost(queue, costs, 200)
    assert served["gold"] / served["bronze"] == pytest.approx(3.0, rel=0.05)


def test_priority_classes_go_first_and_an_idle_tenant_gains_no_credit():
    queue = FairQueue()
    for i in range(16):
        queue.push(f"low{i}", "batch", 1.0, rank=2, cost=1.0)
    queue.push("high", "interactive", 1.0, rank=0, cost=100.0)
    assert queue.pop() == "high"
    # A tenant idle while another was served starts at the current virtual time, not at 0.
    queue = FairQueue()
    for i in range(50):
        queue.push(f"busy{i}", "busy", 1.0, rank=1, cost=10.0)
    for _ in range(40):
        queue.pop()
    for i in range(20):
        queue.push(f"late{i}", "late", 1.0, rank=1, cost=10.0)
    order = [queue.pop() for _ in range(20)]
    # Interleaved with the rest of busy's, not twenty in a row.
    assert sum(name.startswith("busy") for name in order) >= 9


def test_a_removed_waiter_is_skipped_and_not_counted_ahead():
    queue = FairQueue()
    for name in ("a", "b", "c"):
        queue.push(name, "t", 1.0, rank=1, cost=1.0)
    queue.remove("a")
    assert len(queue) == 2 and queue.ahead(1) == 2 and queue.ahead(0) == 0
    assert [queue.pop(), queue.pop(), queue.pop()] == ["b", "c", None]


def test_the_predictor_adds_waiting_first_token_and_each_token_after():
    predictor = DeadlinePredictor(smoothing=0.5)
    assert predictor.finish_s(0.0, 100) is None  # nothing seen yet: no refusal on a guess
    predictor.observe(first_token_s=0.2, per_token_s=0.01, hold_s=2.0)
    predictor.observe(first_token_s=0.4, per_token_s=0.03, hold_s=4.0)
    assert (predictor.first_token_s, predictor.per_token_s, predictor.hold_s) == pytest.approx(
        (0.3, 0.02, 3.0)
    )
    assert predictor.finish_s(0.0, 101) == pytest.approx(0.3 + 100 * 0.02)
    # 4 slots, all busy, 9 ahead: the tenth slot to free up, one every 3.0 / 4 s.
    assert predictor.wait_s(ahead=9, slots=4, free_slots=0) == pytest.approx(10 / 4 * 3.0)
    assert predictor.wait_s(ahead=1, slots=4, free_slots=2) == 0.0


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_gate_lets_waiters_through_by_priority_then_share():
    async def scenario():
        gate = AdmissionGate(slots=1, max_waiting=10, clock=Clock())
        holder = await gate.admit("a", 1.0, 1, 1.0, 10, None, timeout_s=5)
        order: list[str] = []

        async def waiter(name: str, rank: int):
            ticket = await gate.admit(name, 1.0, rank, 1.0, 10, None, timeout_s=5)
            order.append(name)
            ticket.release(None, None, now=0.0)

        tasks = [asyncio.create_task(waiter(f"low{i}", 2)) for i in range(3)]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(waiter("high", 0)))
        await asyncio.sleep(0)
        assert gate.waiting == 4
        holder.release(None, None, now=0.0)
        await asyncio.gather(*tasks)
        return order, gate

    order, gate = asyncio.run(scenario())
    assert order == ["high", "low0", "low1", "low2"]
    assert gate.in_flight == 0 and gate.waiting == 0


def test_the_gate_refuses_what_would_miss_its_deadline_and_a_full_queue_at_once():
    async def scenario():
        clock = Clock()
        gate = AdmissionGate(slots=2, max_waiting=1, clock=clock)
        gate.predictor.observe(first_token_s=0.5, per_token_s=0.1, hold_s=10.0)
        first = await gate.admit("a", 1.0, 1, 1.0, 10, deadline_s=2.0, timeout_s=5)
        await gate.admit("a", 1.0, 1, 1.0, 10, deadline_s=None, timeout_s=5)
        # Slots full: the next waits for one of two to free (10 / 2 s) before its 0.5 + 9 x 0.1 s.
        with pytest.raises(AdmissionRefused) as late:
            await gate.admit("b", 1.0, 1, 1.0, 10, deadline_s=5.0, timeout_s=5)
        assert late.value.reason == "deadline" and late.value.retry_after_s == pytest.approx(5.0)
        waiting = asyncio.create_task(gate.admit("b", 1.0, 1, 1.0, 10, deadline_s=None, timeout_s=5))
        await asyncio.sleep(0)
        with pytest.raises(AdmissionRefused) as full:
            await gate.admit("c", 1.0, 1, 1.0, 10, deadline_s=None, timeout_s=5)
        assert full.value.reason == "queue_full"
        first.release(None, None, now=clock.now)
        await waiting
        return gate

    gate = asyncio.run(scenario())
    assert gate.in_flight == 2


def test_a_waiter_that_gives_up_leaves_its_place_and_takes_no_slot():
    async def scenario():
        gate = AdmissionGate(slots=1, max_waiting=10, clock=Clock())
        holder = await gate.admit("a", 1.0, 1, 1.0, 1, None, timeout_s=5)
        with pytest.raises(TimeoutError):
            await gate.admit("b", 1.0, 1, 1.0, 1, None, timeout_s=0.01)
        cancelled = asyncio.create_task(gate.admit("c", 1.0, 1, 1.0, 1, None, timeout_s=5))
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        assert gate.waiting == 0
        holder.release(None, None, now=0.0)
        holder.release(None, None, now=0.0)  # a second release frees nothing more
        return gate

    gate = asyncio.run(scenario())
    assert gate.in_flight == 0


def test_reserved_slots_take_only_high_priority_requests():
    async def scenario():
        gate = AdmissionGate(slots=3, max_waiting=10, clock=Clock(), reserved_for_high=1)
        lows = [await gate.admit("batch", 1.0, 2, 1.0, 1, None, timeout_s=5) for _ in range(2)]
        third_low = asyncio.create_task(gate.admit("batch", 1.0, 2, 1.0, 1, None, timeout_s=5))
        await asyncio.sleep(0)
        assert gate.waiting == 1 and gate.in_flight == 2
        # The reserved slot is free: high goes straight past the waiting low.
        high = await asyncio.wait_for(gate.admit("search", 1.0, 0, 1.0, 1, None, timeout_s=5), 0.1)
        assert gate.in_flight == 3
        high.release(None, None, now=0.0)
        await asyncio.sleep(0)
        assert gate.waiting == 1, "a low-priority request took the reserved slot"
        lows[0].release(None, None, now=0.0)
        await asyncio.wait_for(third_low, 0.1)
        return gate

    gate = asyncio.run(scenario())
    assert gate.in_flight == 2
