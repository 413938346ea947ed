"""Reading the service's metrics the way Prometheus does: over HTTP, in the exposition format."""

from __future__ import annotations

import time

import httpx
from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample at a /metrics endpoint: (name, labels, value)."""
    text = httpx.get(url, timeout=10).text
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def total(samples, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(
        value
        for sample_name, sample_labels, value in samples
        if sample_name == name and all(sample_labels.get(k) == v for k, v in labels.items())
    )


def by_label(samples, name: str, label: str, **labels: str) -> dict[str, float]:
    """Sum of the samples of `name` (filtered by `labels`) per value of `label`."""
    sums: dict[str, float] = {}
    for sample_name, sample_labels, value in samples:
        if sample_name == name and all(sample_labels.get(k) == v for k, v in labels.items()):
            sums[sample_labels[label]] = sums.get(sample_labels[label], 0.0) + value
    return sums


# Ray exports every process's metrics this often in the suite (tests/ray_instance.py sets
# RAY_metrics_report_interval_ms to 1000).
EXPORT_INTERVAL_S = 1.0
CUMULATIVE_SUFFIXES = ("_total", "_bucket", "_count", "_sum")


def settled(
    url: str,
    prefixes=("ray_serve_deployment_request_counter", "ray_ministral_"),
    quiet_exports: int = 3,
    timeout_s: float = 30.0,
):
    """Samples once the counters named by `prefixes` have not moved for `quiet_exports` export
    intervals (every process exported at least that many times meanwhile), polled twice an
    interval; the last ones after `timeout_s`.

    For a baseline, and for what should not have moved: a count that is expected to move is
    waited for with `reached`."""

    def watched(samples):
        # Counters and histograms only: gauges (rates, cache sizes, in-flight counts) may move
        # for ever while nothing happens, and would hold this to its timeout.
        return sorted(
            (name, sorted(labels.items()), value)
            for name, labels, value in samples
            if name.startswith(prefixes) and name.endswith(CUMULATIVE_SUFFIXES)
        )

    samples = scrape(url)
    quiet_since = time.monotonic()
    deadline = quiet_since + timeout_s
    while time.monotonic() - quiet_since < quiet_exports * EXPORT_INTERVAL_S and time.monotonic() < deadline:
        time.sleep(EXPORT_INTERVAL_S / 2)
        latest = scrape(url)
        if watched(latest) != watched(samples):
            quiet_since = time.monotonic()
        samples = latest
    return samples


def reached(url: str, condition, timeout_s: float = 30.0):
    """Samples once `condition(samples)` holds (the last ones after `timeout_s`, for the test to fail on)."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(url)
        if condition(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.5)
