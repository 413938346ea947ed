"""Gauges that stay on /metrics while nothing changes.

Ray 2.60 exports a `ray.serve.metrics.Gauge` only when `set()` is called
and drops it from the Prometheus endpoint two report intervals later, so a
value that stops changing (an idle cache's size) would vanish from Grafana.
`LiveGauge` reads its value and sets it again every half interval.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable


def report_interval_s() -> float:
    # Ray's own setting (default 10 s, floored at 1 s by Ray).
    interval_ms = os.environ.get("RAY_metrics_report_interval_ms", "10000")  # noqa: SIM112 (Ray spells it so)
    return max(1.0, float(interval_ms) / 1000)


class LiveGauge:
    def __init__(self, name: str, description: str, read: Callable[[], float]):
        from ray.serve.metrics import Gauge

        self._gauge = Gauge(name, description=description)
        self._read = read
        self._stopped = threading.Event()
        threading.Thread(target=self._refresh, name=f"gauge-{name}", daemon=True).start()

    def update(self) -> None:
        self._gauge.set(self._read())

    def stop(self) -> None:
        self._stopped.set()

    def _refresh(self) -> None:
        period = report_interval_s() / 2
        while not self._stopped.wait(period):
            self.update()
