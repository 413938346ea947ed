"""`ministral-serve bench-tenants`: fair shares, priority and deadline-aware admission, on stand-in
engines.

What runs is the ingress's admission gate (serve/admission.py's AdmissionGate, the class each
ingress replica runs, with its fair queue and deadline predictor) in front of the stand-in
decoder's continuous batching (deployments/batching_stand_in.py's BatchingEngine: a cost model
of a GPU engine's steps, no model) and a stand-in encoder (one queue that takes a fixed time per
image token), all in this process, on the real clock. Both engines are stand-ins, named as
such in the results: on 2 CPU cores the real ones run a step in tens of milliseconds of CPU that
the load generator and the gate also need, and the real encoder's cost does not grow with the
image the way a GPU's does. What is measured is the policy: who gets the engine, and when.

Three scenarios, each with the gate's slots equal to the engine's batch (`SLOTS`):

- fair share: two tenants of equal weight, closed loop; `light` has 8 clients sending short text,
  `heavy` 32 clients sending large images. Over the run's steady part (after `WARM_UP_S`), each
  tenant's share of decoder seconds (the engine's step time, shared over each step's batch, plus
  the prefill time of the tenant's own prompts). `fair_share_error` is the largest relative
  error of a share against the weights' (0.5 each); `fair_share_error_first_come` is the same
  load with every request at the same finish tag (the stage queues' first come, first served).
- priority: one high-priority client, closed loop, short requests; its time to first token p50
  alone, then under a flood of 48 low-priority clients asking for long completions.
  `priority_ttft_ratio` = flood / alone; `..._without_priority` sends the high client's requests
  at low priority too.
- deadlines: Poisson arrivals at twice what the engine completes at full batch, each client
  giving up `DEADLINE_FACTOR` times a full-batch request's time after sending. Requests finished
  within their deadline, with deadline-aware admission over without (the gate not told the
  deadline: it queues the request, and the client's giving up cancels it wherever it is).

The gate's cost weights are the stand-in's own (a prompt or image token's prefill time over a
generated token's share of a full-batch step), so that equal cost is equal decoder time.
"""

from __future__ import annotations

import asyncio
import json
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from deployments.batching_stand_in import BatchingCostModel, BatchingEngine
from serve.admission import AdmissionGate, AdmissionRefused, CostWeights, request_cost

ROOT = Path(__file__).parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "tenants" / "results.json"
SLOTS = 8
COST = BatchingCostModel(max_num_seqs=SLOTS)
# The stand-in encoder's time per image token (a 1,000-token image: 20 ms).
ENCODER_S_PER_IMAGE_TOKEN = 20e-6
WARM_UP_S = 4.0
DEADLINE_FACTOR = 1.5
TARGETS = {"fair_share_error": 0.15, "priority_ttft_ratio": 1.5, "deadline_goodput_ratio": 1.3}
HIGH, NORMAL, LOW = 0, 1, 2
HIGH_PROMPT_TOKENS = 50


def stand_in_weights(cost: BatchingCostModel = COST) -> CostWeights:
    generated_token_s = cost.step_time_s(SLOTS, 0, 1.0) / SLOTS
    prefill_token = cost.per_prefill_token_s / generated_token_s
    return CostWeights(prompt_token_cost=prefill_token, image_token_cost=prefill_token)


@dataclass(frozen=True)
class Request:
    tenant: str
    rank: int
    prompt_tokens: int
    image_tokens: int
    completion_tokens: int
    weight: float = 1.0
    deadline_s: float | None = None


@dataclass
class Outcome:
    tenant: str
    sent_at: float
    first_token_s: float | None = None
    finished_s: float | None = None
    refused: str | None = None


class StandInEncoder:
    """One encoder replica: images one after another, at ENCODER_S_PER_IMAGE_TOKEN."""

    def __init__(self) -> None:
        self._busy = asyncio.Lock()

    async def encode(self, image_tokens: int) -> None:
        async with self._busy:
            await asyncio.sleep(image_tokens * ENCODER_S_PER_IMAGE_TOKEN)


class Stack:
    """The gate, the stand-in encoder and the stand-in engine, with per-tenant decoder seconds."""

    def __init__(self, reserved_for_high: int = 0, fair: bool = True):
        self.gate = AdmissionGate(
            SLOTS, max_waiting=100_000, clock=time.monotonic, reserved_for_high=reserved_for_high
        )
        self.engine = BatchingEngine(COST, speed=1.0)
        self.encoder = StandInEncoder()
        self.weights = stand_in_weights()
        self.fair = fair
        self.decoder_s: dict[str, float] = {}
        # Decoder seconds are counted in [counting_from, counting_until): after the warm-up, and
        # not while the requests left at the end drain without contention.
        self.counting_from = float("inf")
        self.counting_until = float("inf")
        self._tokens = random.Random(7)

    def _charge(self, tenant: str):
        def charge(seconds: float) -> None:
            if self.counting_from <= time.monotonic() < self.counting_until:
                self.decoder_s[tenant] = self.decoder_s.get(tenant, 0.0) + seconds

        return charge

    async def send(self, request: Request, deadline_aware: bool = True) -> Outcome:
        outcome = Outcome(request.tenant, time.monotonic())
        cost = request_cost(
            request.prompt_tokens, request.image_tokens, request.completion_tokens, self.weights
        )
        try:
            ticket = await self.gate.admit(
                # First come, first served: every request at the same tag.
                request.tenant if self.fair else "everyone",
                request.weight,
                request.rank,
                cost if self.fair else 1.0,
                request.completion_tokens,
                request.deadline_s if deadline_aware else None,
                timeout_s=600,
            )
        except AdmissionRefused as refused:
            outcome.refused = refused.reason
            return outcome
        admitted_at = time.monotonic()
        first_token_at = last_token_at = None
        try:
            if request.image_tokens:
                await self.encoder.encode(request.image_tokens)
            # Unique token ids: no request finds another's prompt in the prefix cache.
            prompt = [
                self._tokens.randrange(1, 1 << 30)
                for _ in range(request.prompt_tokens + request.image_tokens)
            ]
            async for _ in self.engine.generate(
                prompt, request.completion_tokens, request.rank, self._charge(request.tenant)
            ):
                last_token_at = time.monotonic()
                if first_token_at is None:
                    first_token_at = last_token_at
                    outcome.first_token_s = first_token_at - outcome.sent_at
            outcome.finished_s = time.monotonic() - outcome.sent_at
        finally:
            per_token = None
            if first_token_at is not None and request.completion_tokens > 1:
                per_token = (last_token_at - first_token_at) / (request.completion_tokens - 1)
            ticket.release(
                first_token_at - admitted_at if first_token_at else None, per_token, time.monotonic()
            )
        return outcome


async def closed_loop(stack: Stack, make, clients: int, until: float, outcomes: list[Outcome]) -> None:
    async def client(k: int) -> None:
        while time.monotonic() < until:
            outcomes.append(await stack.send(make(k)))

    await asyncio.gather(*(client(k) for k in range(clients)))


async def fair_share(seconds: float, fair: bool) -> dict:
    stack = Stack(fair=fair)
    until = stack.counting_until = time.monotonic() + seconds
    stack.counting_from = time.monotonic() + WARM_UP_S
    light = lambda k: Request("light", NORMAL, prompt_tokens=50, image_tokens=0, completion_tokens=50)  # noqa: E731
    heavy = lambda k: Request("heavy", NORMAL, prompt_tokens=20, image_tokens=1600, completion_tokens=50)  # noqa: E731
    outcomes: list[Outcome] = []
    await asyncio.gather(
        closed_loop(stack, light, 8, until, outcomes), closed_loop(stack, heavy, 32, until, outcomes)
    )
    stack.engine.close()
    total = sum(stack.decoder_s.values())
    shares = {tenant: seconds_ / total for tenant, seconds_ in sorted(stack.decoder_s.items())}
    return {
        "decoder_seconds": stack.decoder_s,
        "shares": shares,
        "error": max(abs(share - 0.5) / 0.5 for share in shares.values()),
        "requests": {t: sum(o.tenant == t for o in outcomes) for t in ("light", "heavy")},
    }


async def high_priority_ttft(seconds: float, flood: bool, with_priority: bool) -> dict:
    stack = Stack(reserved_for_high=SLOTS // 8 if with_priority else 0)
    until = time.monotonic() + seconds
    rank = HIGH if with_priority else LOW
    high: list[Outcome] = []
    flood_outcomes: list[Outcome] = []
    started = time.monotonic() + (WARM_UP_S if flood else 0.0)

    async def high_client() -> None:
        await asyncio.sleep(max(0.0, started - time.monotonic()))
        while time.monotonic() < until:
            high.append(await stack.send(Request("search", rank, HIGH_PROMPT_TOKENS, 0, 16)))

    low = lambda k: Request("batch", LOW, prompt_tokens=200, image_tokens=0, completion_tokens=100)  # noqa: E731
    runs = [high_client()]
    if flood:
        runs.append(closed_loop(stack, low, 48, until, flood_outcomes))
    await asyncio.gather(*runs)
    stack.engine.close()
    ttfts = [o.first_token_s for o in high if o.first_token_s is not None]
    return {
        "ttft_p50_s": statistics.median(ttfts),
        "requests": len(ttfts),
        "flood_requests": len(flood_outcomes),
    }


async def deadlines(seconds: float, deadline_aware: bool, seed: int = 11) -> dict:
    stack = Stack()
    completion = 50
    full_batch_s = completion * COST.step_time_s(SLOTS, 0, 1.0)
    deadline = DEADLINE_FACTOR * full_batch_s
    rate = 2 * SLOTS / full_batch_s
    arrivals = random.Random(seed)
    outcomes: list[Outcome] = []

    async def one() -> None:
        request = Request("api", NORMAL, 100, 0, completion, deadline_s=deadline)
        outcome = Outcome("api", time.monotonic())
        try:
            outcome = await asyncio.wait_for(stack.send(request, deadline_aware), deadline)
        except TimeoutError:
            outcome.refused = "client_gave_up"
        outcomes.append(outcome)

    tasks = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        tasks.append(asyncio.create_task(one()))
        await asyncio.sleep(arrivals.expovariate(rate))
    await asyncio.gather(*tasks)
    stack.engine.close()
    in_time = [o for o in outcomes if o.finished_s is not None and o.finished_s <= deadline]
    return {
        "offered_rps": rate,
        "deadline_s": deadline,
        "sent": len(outcomes),
        "finished_in_time": len(in_time),
        "refused_at_once": sum(o.refused == "deadline" for o in outcomes),
        "client_gave_up": sum(o.refused == "client_gave_up" for o in outcomes),
    }


def priority_ttft_floor(prompt_tokens: int = HIGH_PROMPT_TOKENS) -> float:
    """The least `priority_ttft_ratio` the cost model allows with a free slot waiting: under the
    flood, a request waits half a full batch's step on average for the step under way to end,
    then takes one full-batch step with its prefill; alone, one step of its own."""
    full = COST.step_time_s(SLOTS, prompt_tokens, 1.0)
    return (COST.step_time_s(SLOTS, 0, 1.0) / 2 + full) / COST.step_time_s(1, prompt_tokens, 1.0)


async def run_all(seconds: float) -> dict:
    fair = await fair_share(seconds, fair=True)
    first_come = await fair_share(seconds, fair=False)
    alone = await high_priority_ttft(seconds / 2, flood=False, with_priority=True)
    flooded = await high_priority_ttft(seconds, flood=True, with_priority=True)
    unprioritised = await high_priority_ttft(seconds, flood=True, with_priority=False)
    aware = await deadlines(seconds * 1.5, deadline_aware=True)
    unaware = await deadlines(seconds * 1.5, deadline_aware=False)
    summary = {
        "fair_share_error": fair["error"],
        "fair_share_error_first_come": first_come["error"],
        "priority_ttft_ratio": flooded["ttft_p50_s"] / alone["ttft_p50_s"],
        "priority_ttft_ratio_without_priority": unprioritised["ttft_p50_s"] / alone["ttft_p50_s"],
        "priority_ttft_ratio_floor": priority_ttft_floor(),
        "deadline_goodput_ratio": aware["finished_in_time"] / max(1, unaware["finished_in_time"]),
    }
    return {
        "stand_ins": (
            "decoder: deployments/batching_stand_in.py BatchingEngine (cost model, no model); "
            "encoder: one queue at ENCODER_S_PER_IMAGE_TOKEN; the admission gate is the service's own"
        ),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "settings": {
            "seconds": seconds,
            "slots": SLOTS,
            "cost_model": asdict(COST),
            "cost_weights": asdict(stand_in_weights()),
            "encoder_s_per_image_token": ENCODER_S_PER_IMAGE_TOKEN,
            "warm_up_s": WARM_UP_S,
            "deadline_factor": DEADLINE_FACTOR,
        },
        "targets": TARGETS,
        "summary": summary,
        "meets_targets": {
            "fair_share_error": summary["fair_share_error"] <= TARGETS["fair_share_error"],
            "priority_ttft_ratio": summary["priority_ttft_ratio"] <= TARGETS["priority_ttft_ratio"],
            "deadline_goodput_ratio": summary["deadline_goodput_ratio"] >= TARGETS["deadline_goodput_ratio"],
        },
        "scenarios": {
            "fair_share": fair,
            "fair_share_first_come": first_come,
            "priority_alone": alone,
            "priority_flood": flooded,
            "priority_flood_without_priority": unprioritised,
            "deadlines_aware": aware,
            "deadlines_unaware": unaware,
        },
    }


def main(seconds: float = 20.0, output: Path = RESULTS) -> dict:
    results = asyncio.run(run_all(seconds))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    return results
