"""A stand-in decoder: the decoder's interface and routing stats, a cost model instead of a model.

Named a stand-in so that nobody mistakes it for the decoder. It runs no
model: `BatchingEngine` schedules requests as vLLM's continuous batching does
(up to `max_num_seqs` running, the rest waiting, one token per running
request per step, new requests' prompts prefilled in the step that admits
them) and sleeps for each step as long as `BatchingCostModel` says a real
engine would take. Step time grows with the batch and with the prompt tokens
prefilled, and prompt blocks already in its prefix cache cost nothing, so a
router's choices show in latency the way they would on GPUs. Two uses: the
router benchmark (`ministral-serve bench-router`: replicas of different
speeds, which real CPU engines on one machine cannot be) and tests of the
decoder's autoscaling under sustained load.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field

from ray import serve

from autoscaling import policies
from deployments.routing import ThroughputWindow, prefix_block_hashes
from deployments.stream_pacing import chunk_interval_s
from serve.config import AppConfig
from serve.messages import ChoiceDelta, DecodeChunk, DecodeRequest, DecoderLoad, EngineInfo


@dataclass(frozen=True)
class BatchingCostModel:
    """Seconds per engine step at speed 1: `step_s + per_sequence_s x batch + per_prefill_token_s x
    prompt tokens prefilled (not found in the prefix cache)`; a replica at speed s takes 1/s of it."""

    step_s: float = 0.030
    per_sequence_s: float = 0.002
    per_prefill_token_s: float = 0.0001
    max_num_seqs: int = 16
    kv_cache_tokens: int = 262144
    prefix_block_tokens: int = 64
    prefix_cache_blocks: int = 4096

    def step_time_s(self, batch: int, prefill_tokens: int, speed: float) -> float:
        return (self.step_s + self.per_sequence_s * batch + self.per_prefill_token_s * prefill_tokens) / speed


@dataclass
class _Sequence:
    prompt_token_ids: list[int]
    max_tokens: int
    priority: int = 1
    # Told each step's seconds this sequence is charged (benchmarks/tenants.py's accounting).
    charge: Callable[[float], None] | None = None
    generated: int = 0
    prefilled: bool = False
    tokens: asyncio.Queue = field(default_factory=asyncio.Queue)  # one item per step: tokens made


class BatchingEngine:
    """Continuous batching on the event loop, timed by the cost model."""

    def __init__(self, cost: BatchingCostModel, speed: float):
        self.cost = cost
        self.speed = speed
        self._waiting: list[_Sequence] = []
        self._running: list[_Sequence] = []
        self._prefix_cache: OrderedDict[bytes, None] = OrderedDict()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._speed = ThroughputWindow()
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    async def generate(
        self,
        prompt_token_ids: list[int],
        max_tokens: int,
        priority: int = 1,
        charge: Callable[[float], None] | None = None,
    ) -> AsyncIterator[int]:
        """Tokens made per step, until max_tokens; leaving early drops the sequence. Waiting
        sequences start lowest `priority` first, then first come (vLLM's priority policy).
        `charge` is told the sequence's share of each step's time: the step's fixed and
        per-sequence time split evenly over the batch, the prefill time of its own prompt."""
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._steps())
        sequence = _Sequence(prompt_token_ids, max_tokens, priority, charge)
        self._waiting.append(sequence)
        self._wake.set()
        try:
            while sequence.generated < max_tokens or not sequence.tokens.empty():
                yield await sequence.tokens.get()
        finally:
            for queue in (self._waiting, self._running):
                if sequence in queue:
                    queue.remove(sequence)

    def close(self) -> None:
        """Stops the step loop (the engine's owner is done with it)."""
        if self._loop_task is not None:
            self._loop_task.cancel()

    def requests(self) -> int:
        return len(self._waiting) + len(self._running)

    def load(self, now: float) -> DecoderLoad:
        in_flight = self._waiting + self._running
        used = sum(len(s.prompt_token_ids) + s.generated for s in self._running)
        step_s, batch = self._speed.mean_step()
        return DecoderLoad(
            measured_at=now,
            running=len(self._running),
            waiting=len(self._waiting),
            kv_cache_usage=min(1.0, used / self.cost.kv_cache_tokens),
            kv_cache_tokens=self.cost.kv_cache_tokens,
            prefill_tokens_pending=sum(len(s.prompt_token_ids) for s in in_flight if not s.prefilled),
            decode_tokens_pending=sum(s.max_tokens - s.generated for s in in_flight),
            max_running=self.cost.max_num_seqs,
            step_s=step_s,
            batch=batch,
            tokens_per_s=self._speed.rate(),
            prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
        )

    def _uncached_tokens(self, sequence: _Sequence) -> int:
        """Prompt tokens not in the prefix cache; the prompt's blocks are cached from now on."""
        blocks = prefix_block_hashes(sequence.prompt_token_ids, self.cost.prefix_block_tokens)
        hit = 0
        for block in blocks:
            if block not in self._prefix_cache:
                break
            hit += 1
        for block in blocks:
            self._prefix_cache[block] = None
            self._prefix_cache.move_to_end(block)
        while len(self._prefix_cache) > self.cost.prefix_cache_blocks:
            self._prefix_cache.popitem(last=False)
        cached = hit * self.cost.prefix_block_tokens
        self.prefix_cache_queries += len(sequence.prompt_token_ids)
        self.prefix_cache_hits += cached
        return len(sequence.prompt_token_ids) - cached

    async def _steps(self) -> None:
        while True:
            if not self._waiting and not self._running:
                self._wake.clear()
                await self._wake.wait()
            admitted = []
            while self._waiting and len(self._running) + len(admitted) < self.cost.max_num_seqs:
                first = min(self._waiting, key=lambda sequence: sequence.priority)
                self._waiting.remove(first)
                admitted.append(first)
            prefills = {id(s): self._uncached_tokens(s) for s in admitted}
            prefill = sum(prefills.values())
            self._running.extend(admitted)
            batch = list(self._running)
            started = time.monotonic()
            await asyncio.sleep(self.cost.step_time_s(len(batch), prefill, self.speed))
            shared_s = self.cost.step_time_s(len(batch), 0, self.speed) / len(batch)
            for sequence in batch:
                if sequence.charge is not None:
                    own_prefill_s = self.cost.per_prefill_token_s * prefills.get(id(sequence), 0) / self.speed
                    sequence.charge(shared_s + own_prefill_s)
                sequence.prefilled = True
                sequence.generated += 1
                sequence.tokens.put_nowait(1)
                if sequence.generated >= sequence.max_tokens and sequence in self._running:
                    self._running.remove(sequence)
            self._speed.add(time.time(), time.monotonic() - started, len(batch))


@serve.deployment(name="Decoder")
class StandInBatchingDecoder:
    """The decoder's methods and routing stats over `BatchingEngine`. `speeds`: each replica's
    speed by its rank (Serve numbers replicas 0, 1, ...), cycled. Without a `cost`, the
    default one with the config's engine.max_num_seqs."""

    def __init__(
        self, config: AppConfig, speeds: tuple[float, ...] = (1.0,), cost: BatchingCostModel | None = None
    ):
        rank = serve.get_replica_context().rank.rank
        self.speed = speeds[rank % len(speeds)]
        cost = cost or BatchingCostModel(max_num_seqs=config.engine.max_num_seqs)
        self._engine = BatchingEngine(cost, self.speed)
        self._streaming = config.streaming

    async def generate(self, request: DecodeRequest, images=None) -> AsyncIterator[DecodeChunk]:
        """One token id (0) per step, in chunks paced as the decoder paces them (`streaming`)."""
        max_tokens = request.sampling.max_tokens
        sent = 0
        pending = 0
        last_sent = 0.0
        async for made in self._engine.generate(request.prompt_token_ids, max_tokens, request.priority):
            pending += made
            now = time.monotonic()
            done = sent + pending >= max_tokens
            interval_s = chunk_interval_s(self._engine.requests(), self._streaming)
            if sent == 0 or done or now - last_sent >= interval_s:
                sent += pending
                yield DecodeChunk(
                    choices=[
                        ChoiceDelta(
                            index=0,
                            text="x" * pending,
                            token_ids=[0] * pending,
                            finish_reason="length" if done else None,
                        )
                    ]
                )
                pending, last_sent = 0, now

    async def engine_info(self) -> EngineInfo:
        return EngineInfo(max_model_len=1 << 20, vocab_size=131072, system_fingerprint="stand-in")

    async def num_unfinished_requests(self) -> int:
        return self._engine.requests()

    def record_routing_stats(self) -> dict:
        return asdict(self._engine.load(time.time()))

    def record_autoscaling_stats(self) -> dict[str, float]:
        load = self._engine.load(time.time())
        return {policies.WAITING: load.waiting, policies.KV_CACHE_USAGE: load.kv_cache_usage}
