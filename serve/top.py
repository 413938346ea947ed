"""`ministral-serve top`: the service's metrics in a terminal, refreshing in place.

It reads the metrics endpoint that `ministral-serve run` prints (Ray's
metrics agent) every few seconds; no Prometheus needed. Rates and latency
percentiles are over a sliding window, from the difference of two readings,
as Prometheus' `rate` and `histogram_quantile` would compute them. The window
is longer than a refresh because Ray updates the endpoint only once per
report interval (10 s by default): the difference of two refreshes a second
apart is zero most of the time and ten times the rate once.
"""

from __future__ import annotations

import math
import time
import urllib.request
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from serve import metrics as m

Labels = frozenset[tuple[str, str]]


@dataclass(frozen=True)
class Reading:
    """Every sample of one scrape, by series name, and when it was taken."""

    taken_at: float
    samples: dict[str, dict[Labels, float]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, taken_at: float, names: frozenset[str] | None = None) -> Reading:
        """`names`: keep only these series. Ray's endpoint carries thousands of its own
        samples; parsing only ours keeps a refresh quick on a machine busy serving."""
        from prometheus_client.parser import text_string_to_metric_families

        if names is not None:
            text = "\n".join(line for line in text.splitlines() if _series_name(line) in names)
        samples: dict[str, dict[Labels, float]] = defaultdict(dict)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[sample.name][frozenset(sample.labels.items())] = sample.value
        return cls(taken_at, dict(samples))

    def series(self, name: str) -> dict[Labels, float]:
        return self.samples.get(name, {})


def _series_name(line: str) -> str:
    # Comment lines (HELP, TYPE) name no series, so they are dropped with the rest.
    return line.split("{", 1)[0].split(" ", 1)[0]


def _label(labels: Labels, key: str) -> str:
    return dict(labels).get(key, "")


def summed(reading: Reading, name: str, by: str | None = None) -> dict[str, float]:
    totals: dict[str, float] = defaultdict(float)
    for labels, value in reading.series(name).items():
        totals[_label(labels, by) if by else ""] += value
    return dict(totals)


def rates(
    before: Reading,
    after: Reading,
    name: str,
    by: str | None = None,
    where: Callable[[Labels], bool] | None = None,
) -> dict[str, float]:
    """Per-second increase of a counter between two readings, series by series (as
    Prometheus' `sum by (...) (rate(...))`), so that one replica's restart counts from zero
    without hiding the others' progress. `where`: only the series whose labels it accepts
    (a selector's matchers)."""
    elapsed = after.taken_at - before.taken_at
    if elapsed <= 0:
        return {}
    earlier = before.series(name)
    totals: dict[str, float] = defaultdict(float)
    for labels, value in after.series(name).items():
        if where is not None and not where(labels):
            continue
        totals[_label(labels, by) if by else ""] += _increase(earlier.get(labels, 0.0), value) / elapsed
    return dict(totals)


def _increase(earlier: float, later: float) -> float:
    # A counter below its earlier value was reset (its replica restarted).
    return later - earlier if later >= earlier else later


def quantile(before: Reading, after: Reading, metric: m.Metric, q: float) -> float | None:
    """The q-quantile of a histogram's observations between two readings (linear within a bucket)."""
    increase: dict[float, float] = defaultdict(float)
    for reading, sign in ((after, 1.0), (before, -1.0)):
        for labels, value in reading.series(metric.buckets).items():
            increase[float(_label(labels, "le"))] += sign * value
    bounds = sorted(increase)
    if not bounds or increase[bounds[-1]] <= 0:
        return None
    rank = q * increase[bounds[-1]]
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        if increase[bound] >= rank:
            if math.isinf(bound):
                return lower_bound
            width = increase[bound] - lower_count
            return lower_bound + (bound - lower_bound) * ((rank - lower_count) / width if width else 1.0)
        lower_bound, lower_count = bound, increase[bound]
    return None


@dataclass(frozen=True)
class ServiceRow:
    requests_per_s: float
    prompt_tokens_per_s: float
    generated_tokens_per_s: float
    in_flight: float
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    tpot_p50_s: float | None


@dataclass(frozen=True)
class StageRow:
    stage: str
    replicas: float
    in_progress: float
    queued: float


@dataclass(frozen=True)
class DecoderReplicaRow:
    replica: str
    generated_tokens_per_s: float
    running: float
    waiting: float
    kv_cache_use: float


@dataclass(frozen=True)
class TenantRow:
    tenant: str
    requests_per_s: float
    # Share of the tenant's answers that were not 2xx; None without answers in the window.
    error_share: float | None
    # Prompt tokens with the image tokens, as the decoder sees them.
    prompt_tokens_per_s: float
    completion_tokens_per_s: float
    # Summed over the ingress replicas (each exports its own).
    in_flight: float
    rejections_per_s: float


@dataclass(frozen=True)
class View:
    service: ServiceRow
    stages: list[StageRow]
    decoder_replicas: list[DecoderReplicaRow]
    tenants: list[TenantRow]


def _not_2xx(labels: Labels) -> bool:
    return not _label(labels, "status").startswith("2")


def tenant_rows(before: Reading, after: Reading) -> list[TenantRow]:
    """One row per tenant, the busiest (completion tokens per second) first."""
    requests = rates(before, after, m.TENANT_REQUESTS.series, "tenant")
    errors = rates(before, after, m.TENANT_REQUESTS.series, "tenant", where=_not_2xx)
    prompt = rates(before, after, m.TENANT_PROMPT_TOKENS.series, "tenant")
    image = rates(before, after, m.TENANT_IMAGE_TOKENS.series, "tenant")
    completion = rates(before, after, m.TENANT_COMPLETION_TOKENS.series, "tenant")
    rejections = rates(before, after, m.TENANT_REJECTIONS.series, "tenant")
    in_flight = summed(after, m.TENANT_REQUESTS_IN_FLIGHT.series, "tenant")
    names = set(requests) | set(prompt) | set(image) | set(completion) | set(rejections) | set(in_flight)
    rows = [
        TenantRow(
            name,
            requests.get(name, 0.0),
            errors.get(name, 0.0) / requests[name] if requests.get(name, 0.0) > 0 else None,
            prompt.get(name, 0.0) + image.get(name, 0.0),
            completion.get(name, 0.0),
            in_flight.get(name, 0.0),
            rejections.get(name, 0.0),
        )
        for name in names
        if name
    ]
    return sorted(rows, key=lambda row: (-row.completion_tokens_per_s, row.tenant))


def view(before: Reading, after: Reading) -> View:
    service = ServiceRow(
        requests_per_s=sum(rates(before, after, m.REQUESTS.series).values()),
        prompt_tokens_per_s=sum(rates(before, after, m.PROMPT_TOKENS.series).values()),
        generated_tokens_per_s=sum(rates(before, after, m.GENERATION_TOKENS.series).values()),
        in_flight=sum(summed(after, m.REQUESTS_IN_FLIGHT.series).values()),
        ttft_p50_s=quantile(before, after, m.TIME_TO_FIRST_TOKEN, 0.5),
        ttft_p95_s=quantile(before, after, m.TIME_TO_FIRST_TOKEN, 0.95),
        tpot_p50_s=quantile(before, after, m.TIME_PER_OUTPUT_TOKEN, 0.5),
    )
    healthy = summed(after, m.SERVE_REPLICA_HEALTHY.series, "deployment")
    in_progress = summed(after, m.SERVE_PROCESSING.series, "deployment")
    queued = summed(after, m.SERVE_QUEUED.series, "deployment")
    stages = [
        StageRow(stage, healthy.get(stage, 0.0), in_progress.get(stage, 0.0), queued.get(stage, 0.0))
        for stage in sorted(set(healthy) | set(in_progress))
        if stage
    ]
    tokens = rates(before, after, m.VLLM_GENERATION_TOKENS.series, "ReplicaId")
    running = summed(after, m.VLLM_RUNNING.series, "ReplicaId")
    waiting = summed(after, m.VLLM_WAITING.series, "ReplicaId")
    kv = summed(after, m.VLLM_KV_CACHE_USAGE.series, "ReplicaId")
    replicas = [
        DecoderReplicaRow(
            replica,
            tokens.get(replica, 0.0),
            running.get(replica, 0.0),
            waiting.get(replica, 0.0),
            kv.get(replica, 0.0),
        )
        for replica in sorted(set(running) | set(tokens))
    ]
    return View(service, stages, replicas, tenant_rows(before, after))


WATCHED = frozenset(
    (
        m.REQUESTS.series,
        m.PROMPT_TOKENS.series,
        m.GENERATION_TOKENS.series,
        m.REQUESTS_IN_FLIGHT.series,
        m.TIME_TO_FIRST_TOKEN.buckets,
        m.TIME_PER_OUTPUT_TOKEN.buckets,
        m.SERVE_REPLICA_HEALTHY.series,
        m.SERVE_PROCESSING.series,
        m.SERVE_QUEUED.series,
        m.VLLM_GENERATION_TOKENS.series,
        m.VLLM_RUNNING.series,
        m.VLLM_WAITING.series,
        m.VLLM_KV_CACHE_USAGE.series,
        m.TENANT_REQUESTS.series,
        m.TENANT_PROMPT_TOKENS.series,
        m.TENANT_IMAGE_TOKENS.series,
        m.TENANT_COMPLETION_TOKENS.series,
        m.TENANT_REQUESTS_IN_FLIGHT.series,
        m.TENANT_REJECTIONS.series,
    )
)
"""The series `view` reads."""


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def render(current: View, source: str, caption: str = ""):
    from rich.console import Group
    from rich.table import Table

    service = Table(title=f"ministral-serve top: {source}", title_justify="left", caption=caption)
    for column in ("req/s", "tok/s in", "tok/s out", "in flight", "TTFT p50", "TTFT p95", "TPOT p50"):
        service.add_column(column, justify="right")
    row = current.service
    service.add_row(
        f"{row.requests_per_s:.2f}",
        f"{row.prompt_tokens_per_s:.1f}",
        f"{row.generated_tokens_per_s:.1f}",
        f"{row.in_flight:.0f}",
        _seconds(row.ttft_p50_s),
        _seconds(row.ttft_p95_s),
        _seconds(row.tpot_p50_s),
    )
    stages = Table(title="Stages", title_justify="left")
    for column in ("stage", "replicas", "in progress", "queued"):
        stages.add_column(column, justify="left" if column == "stage" else "right")
    for stage in current.stages:
        stages.add_row(
            stage.stage, f"{stage.replicas:.0f}", f"{stage.in_progress:.0f}", f"{stage.queued:.0f}"
        )
    replicas = Table(title="Decoder replicas", title_justify="left")
    for column in ("replica", "tok/s out", "running", "waiting", "KV cache"):
        replicas.add_column(column, justify="left" if column == "replica" else "right")
    for replica in current.decoder_replicas:
        replicas.add_row(
            replica.replica,
            f"{replica.generated_tokens_per_s:.1f}",
            f"{replica.running:.0f}",
            f"{replica.waiting:.0f}",
            f"{replica.kv_cache_use:.0%}",
        )
    tenants = Table(title="Tenants", title_justify="left")
    for column in ("tenant", "req/s", "errors", "tok/s in", "tok/s out", "in flight", "rejected/s"):
        tenants.add_column(column, justify="left" if column == "tenant" else "right")
    for tenant in current.tenants:
        tenants.add_row(
            tenant.tenant,
            f"{tenant.requests_per_s:.2f}",
            _share(tenant.error_share),
            f"{tenant.prompt_tokens_per_s:.1f}",
            f"{tenant.completion_tokens_per_s:.1f}",
            f"{tenant.in_flight:.0f}",
            f"{tenant.rejections_per_s:.2f}",
        )
    return Group(service, stages, replicas, tenants)


class MetricsUnavailable(Exception):
    pass


def fetch(url: str) -> Reading:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return Reading.parse(response.read().decode(), time.monotonic(), WATCHED)
    except OSError as e:
        raise MetricsUnavailable(
            f"cannot read metrics at {url} ({e}); is the service running, and on that metrics port?"
        ) from e


class Window:
    """The readings of the last `span_s` seconds: rates are taken between its oldest and newest."""

    def __init__(self, span_s: float) -> None:
        self.span_s = span_s
        self._readings: deque[Reading] = deque()

    def add(self, reading: Reading) -> None:
        self._readings.append(reading)
        # Keep the newest reading at least span_s old, so the window covers span_s once it can.
        while len(self._readings) > 2 and reading.taken_at - self._readings[1].taken_at >= self.span_s:
            self._readings.popleft()

    @property
    def ends(self) -> tuple[Reading, Reading]:
        return self._readings[0], self._readings[-1]


def watch(
    url: str,
    *,
    interval_s: float = 2.0,
    window_s: float = 30.0,
    read: Callable[[str], Reading] = fetch,
) -> None:
    from rich.live import Live

    window = Window(window_s)
    window.add(read(url))
    first, _ = window.ends
    with Live(render(view(first, first), url, "waiting for a second reading"), auto_refresh=False) as live:
        while True:
            time.sleep(interval_s)
            try:
                window.add(read(url))
            except MetricsUnavailable as e:
                # A restarting service should not end the watch: say so and keep the last figures.
                live.update(render(view(*window.ends), url, f"{e}; retrying"), refresh=True)
                continue
            oldest, newest = window.ends
            caption = (
                f"over the last {newest.taken_at - oldest.taken_at:.0f} s, at {time.strftime('%H:%M:%S')}"
            )
            live.update(render(view(oldest, newest), url, caption), refresh=True)
