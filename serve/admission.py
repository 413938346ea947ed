"""Admission at the ingress: which waiting request goes to the encoder and decoder next, and
which cannot finish before its client gives up.

Pure policy (`FairQueue`, `DeadlinePredictor`, `request_cost`) with an injected clock, and a
thin asyncio gate (`AdmissionGate`) around them. The gate holds at most
`max_in_flight` requests past this ingress replica at once; the rest wait here,
where their order is decided, instead of in the stages' first-come queues.

Order: priority class first (high, normal, low), then start-time fair queuing
by cost within a class. Each tenant has a finish tag; a request of cost c from
a tenant of weight w arriving at virtual time V gets

    start  = max(V, tenant's finish tag)
    finish = start + c / w          (the tenant's new finish tag)

and requests leave in order of start tags (V becomes the start tag of the
request that left). Two backlogged tenants thus get cost in proportion to
their weights, whatever the size of their requests; an idle tenant gains no
credit (its tag is caught up to V).

A request's cost is work in decode-step units: its completion tokens, plus
its prompt tokens at `prompt_token_cost` each (a prefill step handles many at
once), plus its image tokens at `image_token_cost` each (their prefill and
the encoder's work).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class CostWeights:
    prompt_token_cost: float = 0.1
    image_token_cost: float = 0.25


def request_cost(
    prompt_tokens: int, image_tokens: int, completion_tokens: int, weights: CostWeights
) -> float:
    """Decode-step units of work; text prompt tokens exclude the image tokens."""
    return (
        completion_tokens
        + weights.prompt_token_cost * prompt_tokens
        + weights.image_token_cost * image_tokens
    )


@dataclass(order=True)
class _Queued:
    rank: int
    start_tag: float
    sequence: int
    ticket: object = field(compare=False)
    cost: float = field(compare=False)
    cancelled: bool = field(default=False, compare=False)


class FairQueue:
    """Priority classes, and start-time fair queuing by cost within each."""

    def __init__(self) -> None:
        self._heap: list[_Queued] = []
        self._finish_tags: dict[str, float] = {}
        self._virtual_time = 0.0
        self._sequence = itertools.count()
        self._by_ticket: dict[object, _Queued] = {}

    def __len__(self) -> int:
        return len(self._by_ticket)

    def push(self, ticket: object, tenant: str, weight: float, rank: int, cost: float) -> None:
        start = max(self._virtual_time, self._finish_tags.get(tenant, 0.0))
        self._finish_tags[tenant] = start + cost / weight
        entry = _Queued(rank, start, next(self._sequence), ticket, cost)
        heapq.heappush(self._heap, entry)
        self._by_ticket[ticket] = entry

    def head_rank(self) -> int | None:
        """The priority class of the request that would leave next (None: empty)."""
        while self._heap and self._heap[0].cancelled:
            heapq.heappop(self._heap)
        return self._heap[0].rank if self._heap else None

    def pop(self) -> object | None:
        while self._heap:
            entry = heapq.heappop(self._heap)
            if entry.cancelled:
                continue
            del self._by_ticket[entry.ticket]
            self._virtual_time = max(self._virtual_time, entry.start_tag)
            return entry.ticket
        return None

    def remove(self, ticket: object) -> None:
        """A waiter that gave up (disconnected, timed out) leaves the queue."""
        entry = self._by_ticket.pop(ticket, None)
        if entry is not None:
            entry.cancelled = True

    def ahead(self, rank: int) -> int:
        """Requests that would leave before a new one of priority `rank` (at least those of a
        higher or equal class: fair queuing may put it before some of its own class)."""
        return sum(1 for entry in self._by_ticket.values() if entry.rank <= rank)


class DeadlinePredictor:
    """When a request admitted now would end, from what this replica saw of the recent ones.

    A request waits for `ahead` others to leave the gate, each slot freeing
    once per mean hold time; then it takes the recent time from admission to
    first token, and the recent time per output token for each token it may
    generate. Means are exponentially weighted (each observation counts
    `smoothing` of the new mean). With nothing observed yet there is nothing
    to predict from: everything is admitted.
    """

    def __init__(self, smoothing: float = 0.2):
        self.smoothing = smoothing
        self.first_token_s: float | None = None
        self.per_token_s: float | None = None
        self.hold_s: float | None = None

    def _mean(self, mean: float | None, value: float) -> float:
        return value if mean is None else mean + self.smoothing * (value - mean)

    def observe(self, first_token_s: float | None, per_token_s: float | None, hold_s: float) -> None:
        if first_token_s is not None:
            self.first_token_s = self._mean(self.first_token_s, first_token_s)
        if per_token_s is not None:
            self.per_token_s = self._mean(self.per_token_s, per_token_s)
        self.hold_s = self._mean(self.hold_s, hold_s)

    def wait_s(self, ahead: int, slots: int, free_slots: int) -> float:
        """Seconds until a request behind `ahead` others gets one of `slots`: the busy slots
        free up one every hold time / slots, on average."""
        if ahead < free_slots or self.hold_s is None:
            return 0.0
        return (ahead - free_slots + 1) / slots * self.hold_s

    def finish_s(self, wait_s: float, completion_tokens: int) -> float | None:
        """Seconds from now until the request would have its last token (None: unknown)."""
        if self.first_token_s is None:
            return None
        return wait_s + self.first_token_s + max(0, completion_tokens - 1) * (self.per_token_s or 0.0)


class AdmissionRefused(Exception):
    """The gate cannot take the request: its queue is full, or the request would not finish in
    time. `retry_after_s`: when it might."""

    def __init__(self, reason: str, message: str, retry_after_s: float):
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s


@dataclass
class AdmissionTicket:
    """A request past the gate: `release` when it ends (the ASGI middleware does, after the
    response's last byte, so that a stream holds its slot while it runs)."""

    gate: AdmissionGate
    admitted_at: float
    released: bool = False

    def release(self, first_token_s: float | None, per_token_s: float | None, now: float) -> None:
        if self.released:
            return
        self.released = True
        self.gate.predictor.observe(first_token_s, per_token_s, now - self.admitted_at)
        self.gate._release()


class AdmissionGate:
    """At most `slots` requests past this replica at once; the others wait in a FairQueue.

    `reserved_for_high` of the slots take only high-priority requests: a
    high-priority request that arrives while the rest are busy with others
    starts at once instead of waiting for one of them to end (the engine
    does not preempt a running request for a waiting one)."""

    def __init__(
        self,
        slots: int,
        max_waiting: int,
        clock: Callable[[], float],
        predictor: DeadlinePredictor | None = None,
        reserved_for_high: int = 0,
    ):
        self.slots = slots
        self.reserved_for_high = reserved_for_high
        self.max_waiting = max_waiting
        self.clock = clock
        self.predictor = predictor or DeadlinePredictor()
        self.in_flight = 0
        self._queue = FairQueue()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def _slots_for(self, rank: int) -> float:
        return self.slots if rank == 0 else self.slots - self.reserved_for_high

    def predicted_finish_s(self, rank: int, completion_tokens: int) -> tuple[float, float | None]:
        """(wait for a slot, time until the last token) for a request arriving now."""
        slots = self._slots_for(rank)
        wait = self.predictor.wait_s(self._queue.ahead(rank), slots, slots - self.in_flight)
        return wait, self.predictor.finish_s(wait, completion_tokens)

    async def admit(
        self,
        tenant: str,
        weight: float,
        rank: int,
        cost: float,
        completion_tokens: int,
        deadline_s: float | None,
        timeout_s: float,
    ) -> AdmissionTicket:
        """Wait for a slot. `deadline_s`: how long the client will wait for the whole answer;
        `timeout_s`: the most this request may wait here (what is left of its time limit)."""
        wait, finish = self.predicted_finish_s(rank, completion_tokens)
        if deadline_s is not None and finish is not None and finish > deadline_s:
            raise AdmissionRefused(
                "deadline",
                f"the request would take about {finish:.1f} s to finish, more than the "
                f"{deadline_s:.1f} s the client will wait (X-Request-Timeout / request_timeout)",
                retry_after_s=max(wait, 1.0),
            )
        if self.in_flight < self._slots_for(rank) and not self._queue.ahead(rank):
            self.in_flight += 1
            return AdmissionTicket(self, self.clock())
        if len(self._queue) >= self.max_waiting:
            raise AdmissionRefused(
                "queue_full",
                f"{len(self._queue)} requests are waiting for admission at this replica, its most "
                "(admission.max_waiting); try again shortly",
                retry_after_s=max(wait, 1.0),
            )
        admitted = asyncio.get_running_loop().create_future()
        self._queue.push(admitted, tenant, weight, rank, cost)
        try:
            await asyncio.wait_for(asyncio.shield(admitted), timeout_s)
        except BaseException:
            self._queue.remove(admitted)
            if admitted.done() and not admitted.cancelled():
                # Admitted just as it gave up: hand the slot on.
                admitted.result().released = True
                self._release()
            raise
        return admitted.result()

    def _release(self) -> None:
        self.in_flight -= 1
        # The head is the highest class waiting: if it cannot take a slot, no one can.
        while (rank := self._queue.head_rank()) is not None and self.in_flight < self._slots_for(rank):
            waiter = self._queue.pop()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(AdmissionTicket(self, self.clock()))
