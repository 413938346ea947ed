"""vLLM's engine metrics: exported through Ray, and read for the decoder's routing stats.

vLLM's `RayPrometheusStatLogger` records the engine's figures (ray_vllm_*)
on every engine step. An idle engine takes no steps, so without help its
running requests, waiting requests and KV-cache use would vanish from
dashboards and alerts exactly when the engine goes quiet (Ray drops a gauge
that is not set again: serve.metrics.keep_alive). `HeldRayGauge` keeps each
gauge's last value, as a Prometheus client library does.
"""

from __future__ import annotations

from vllm.v1.metrics.loggers import StatLoggerBase
from vllm.v1.metrics.ray_wrappers import RayGaugeWrapper, RayPrometheusStatLogger
from vllm.v1.metrics.stats import IterationStats, SchedulerStats

from deployments.routing import ThroughputWindow
from serve.messages import DecoderLoad
from serve.metrics import keep_alive


class HeldRayGauge(RayGaugeWrapper):
    _kept_as: int | None = None

    def set(self, value: float):
        # vLLM sets labelled copies (`labels()` returns a copy.copy of the
        # gauge), so each object is kept from its own first `set()`: a copy
        # inherits its original's attributes, but not its id.
        if self._kept_as != id(self):
            self._kept_as = id(self)
            keep_alive(self._set_again)
        self._last_value = value
        return super().set(value)

    def _set_again(self) -> None:
        super().set(self._last_value)


class EngineStatLogger(RayPrometheusStatLogger):
    """vLLM's Ray stat logger, with gauges that stay while the engine idles."""

    _gauge_cls = HeldRayGauge


class EngineLoad:
    """A decoder replica's routing stats (serve.messages.DecoderLoad), as the replica sees them.

    vLLM's scheduler stats at its last step (running, waiting, KV-cache use,
    prefix-cache counters) arrive through `stat_logger`, a logger vLLM calls
    on every engine step; generated tokens per busy second through
    `ThroughputWindow`; the tokens still to prefill and to generate are exact
    sums over the requests this replica holds (`admitted` ... `finished`).
    """

    def __init__(self, kv_cache_tokens: int = 0, max_running: int = 0):
        self.kv_cache_tokens = kv_cache_tokens
        self.max_running = max_running
        self._scheduler: SchedulerStats | None = None
        self._prefix_queries = 0
        self._prefix_hits = 0
        self._speed = ThroughputWindow()
        self.prefill_tokens_pending = 0
        self.decode_tokens_pending = 0

    def stat_logger(self, vllm_config, engine_index: int = 0) -> StatLoggerBase:
        """A per-engine stat logger factory for `AsyncLLM(stat_loggers=[...])`."""
        return _LoadLogger(self)

    def stepped(self, scheduler: SchedulerStats | None, iteration: IterationStats | None) -> None:
        if scheduler is not None:
            self._scheduler = scheduler
            self._prefix_queries += scheduler.prefix_cache_stats.queries
            self._prefix_hits += scheduler.prefix_cache_stats.hits
        if iteration is not None:
            busy = self._scheduler is not None and self._scheduler.num_running_reqs > 0
            self._speed.record(iteration.iteration_timestamp, iteration.num_generation_tokens, busy)

    def admitted(self, prompt_tokens: int, max_new_tokens: int) -> None:
        self.prefill_tokens_pending += prompt_tokens
        self.decode_tokens_pending += max_new_tokens

    def prefilled(self, prompt_tokens: int) -> None:
        self.prefill_tokens_pending -= prompt_tokens

    def generated(self, tokens: int) -> None:
        self.decode_tokens_pending -= tokens

    def load(self, now: float) -> DecoderLoad:
        scheduler = self._scheduler
        step_s, batch = self._speed.mean_step()
        return DecoderLoad(
            measured_at=now,
            running=scheduler.num_running_reqs if scheduler else 0,
            waiting=scheduler.num_waiting_reqs if scheduler else 0,
            kv_cache_usage=scheduler.kv_cache_usage if scheduler else 0.0,
            kv_cache_tokens=self.kv_cache_tokens,
            prefill_tokens_pending=self.prefill_tokens_pending,
            decode_tokens_pending=self.decode_tokens_pending,
            max_running=self.max_running,
            step_s=step_s,
            batch=batch,
            tokens_per_s=self._speed.rate(),
            prefix_cache_queries=self._prefix_queries,
            prefix_cache_hits=self._prefix_hits,
        )


class _LoadLogger(StatLoggerBase):
    def __init__(self, load: EngineLoad):
        self._load = load

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        self._load.stepped(scheduler_stats, iteration_stats)

    def log_engine_initialized(self):
        pass
