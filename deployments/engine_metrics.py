"""vLLM's engine metrics, exported through Ray from each decoder replica.

vLLM's `RayPrometheusStatLogger` records the engine's figures (ray_vllm_*)
on every engine step. Ray 2.60 drops a gauge from /metrics two report
intervals after its last `set()`, and an idle engine takes no steps, so
running requests, waiting requests and KV-cache use would vanish from
dashboards and alerts exactly when the engine goes quiet. `HeldRayGauge`
sets each gauge again with its last value every half report interval, as a
Prometheus client library keeps a gauge's value until it changes.
"""

from __future__ import annotations

import threading
import time
from typing import ClassVar

from vllm.v1.metrics.ray_wrappers import RayGaugeWrapper, RayPrometheusStatLogger

from serve.metrics import report_interval_s


class HeldRayGauge(RayGaugeWrapper):
    _held: ClassVar[dict[int, HeldRayGauge]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()
    _refresher: ClassVar[threading.Thread | None] = None

    def set(self, value: float):
        self._last_value = value
        with HeldRayGauge._lock:
            HeldRayGauge._held[id(self)] = self
            if HeldRayGauge._refresher is None:
                HeldRayGauge._refresher = threading.Thread(
                    target=HeldRayGauge._refresh, name="vllm-gauges", daemon=True
                )
                HeldRayGauge._refresher.start()
        return super().set(value)

    @classmethod
    def _refresh(cls) -> None:
        period = report_interval_s() / 2
        while True:
            time.sleep(period)
            with cls._lock:
                gauges = list(cls._held.values())
            for gauge in gauges:
                RayGaugeWrapper.set(gauge, gauge._last_value)


class EngineStatLogger(RayPrometheusStatLogger):
    """vLLM's Ray stat logger, with gauges that stay while the engine idles."""

    _gauge_cls = HeldRayGauge
