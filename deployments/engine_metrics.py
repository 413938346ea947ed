"""vLLM's engine metrics, exported through Ray from each decoder replica.

vLLM's `RayPrometheusStatLogger` records the engine's figures (ray_vllm_*)
on every engine step. An idle engine takes no steps, so without help its
running requests, waiting requests and KV-cache use would vanish from
dashboards and alerts exactly when the engine goes quiet (Ray drops a gauge
that is not set again: serve.metrics.keep_alive). `HeldRayGauge` keeps each
gauge's last value, as a Prometheus client library does.
"""

from __future__ import annotations

from vllm.v1.metrics.ray_wrappers import RayGaugeWrapper, RayPrometheusStatLogger

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
