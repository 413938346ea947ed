"""Every metric the service exports, in one catalogue.

Each entry names a series as Prometheus sees it, its kind, its unit (a
Grafana unit id, which the dashboards use), its labels and what it means.
The stages create their own metrics from these entries (`ray_metric`), the
dashboards and alert rules query these names, `dashboards/README.md`'s table
is written from them, and a test compares them with what a running
application exports.

Three sources export through Ray's metrics agent, each with Ray's `ray_`
prefix: this service's stages (`ray_ministral_*`, plus Ray Serve's
`deployment`, `replica` and `application` labels), vLLM's engine in every
decoder replica (`ray_vllm_*`, vLLM's `RayPrometheusStatLogger`, labelled
`model_name`, `engine` and `ReplicaId`), and Ray Serve itself
(`ray_serve_*`), whose per-replica and per-handle gauges give each stage's
concurrency. Ray adds `_total` to counters, and `_bucket`, `_sum` and
`_count` to histograms.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

logger = logging.getLogger(__name__)

Kind = Literal["counter", "gauge", "histogram"]
Source = Literal["ingress", "preprocess", "encoder", "vllm", "ray-serve"]

LATENCY_BOUNDARIES_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_LATENCY_BOUNDARIES_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
STAGE_BOUNDARIES_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# Ray Serve's own tags on every metric a replica creates.
SERVE_LABELS = ("application", "deployment", "replica")
VLLM_LABELS = ("model_name", "engine", "ReplicaId")
ROUTE_LABELS = ("model", "route")


@dataclass(frozen=True)
class Metric:
    name: str
    kind: Kind
    unit: str
    labels: tuple[str, ...]
    source: Source
    description: str
    boundaries: tuple[float, ...] = ()
    # Ray exports a counter from its first increment: one that counts rare
    # events (preemptions) is absent until the first happens.
    absent_until_first_event: bool = False

    @property
    def series(self) -> str:
        """The name to query: counters carry Ray's `_total`."""
        return f"{self.name}_total" if self.kind == "counter" else self.name

    @property
    def buckets(self) -> str:
        return f"{self.name}_bucket"

    @property
    def own_labels(self) -> tuple[str, ...]:
        """The labels the code sets; Ray Serve adds its own to ours."""
        return tuple(label for label in self.labels if label not in SERVE_LABELS)


def _ours(name, kind, unit, labels, source, description, boundaries=()) -> Metric:
    return Metric(
        f"ray_ministral_{name}", kind, unit, (*labels, *SERVE_LABELS), source, description, boundaries
    )


def _vllm(name, kind, unit, description) -> Metric:
    return Metric(f"ray_vllm_{name}", kind, unit, VLLM_LABELS, "vllm", description)


REQUESTS = _ours(
    "requests",
    "counter",
    "short",
    (*ROUTE_LABELS, "status", "error_code"),
    "ingress",
    "HTTP requests answered, by route, status code and OpenAI error code ('' when none); "
    "a stream that fails part-way counts with its error's code.",
)
REQUESTS_IN_FLIGHT = _ours(
    "requests_in_flight",
    "gauge",
    "short",
    (),
    "ingress",
    "HTTP requests received and not yet fully answered (streams until their last event).",
)
REQUEST_DURATION = _ours(
    "request_duration_seconds",
    "histogram",
    "s",
    (*ROUTE_LABELS, "stream"),
    "ingress",
    "From the request's arrival at the ingress to its last byte (a stream's whole duration).",
    LATENCY_BOUNDARIES_S,
)
TIME_TO_FIRST_TOKEN = _ours(
    "time_to_first_token_seconds",
    "histogram",
    "s",
    ROUTE_LABELS,
    "ingress",
    "From the request's arrival at the ingress to the decoder's first token, as the client sees "
    "it: templating, image preprocessing and encoding, queueing and prefill included.",
    LATENCY_BOUNDARIES_S,
)
TIME_PER_OUTPUT_TOKEN = _ours(
    "time_per_output_token_seconds",
    "histogram",
    "s",
    ROUTE_LABELS,
    "ingress",
    "Per request, the time from the first token to the last over the tokens after the first.",
    TOKEN_LATENCY_BOUNDARIES_S,
)
PROMPT_TOKENS = _ours(
    "prompt_tokens",
    "counter",
    "short",
    ROUTE_LABELS,
    "ingress",
    "Prompt tokens of the requests sent to the decoder (image tokens included).",
)
GENERATION_TOKENS = _ours(
    "generation_tokens",
    "counter",
    "short",
    ROUTE_LABELS,
    "ingress",
    "Completion tokens sent back to clients, all choices counted.",
)
IMAGE_REQUESTS = _ours(
    "image_requests",
    "counter",
    "short",
    ("model",),
    "ingress",
    "Requests with at least one image (they go through the preprocess and encoder stages).",
)
TENANT_LABELS = ("model", "tenant")
TENANT_REQUESTS = _ours(
    "tenant_requests",
    "counter",
    "short",
    (*TENANT_LABELS, "status", "error_code"),
    "ingress",
    "Requests answered on every route but /health, by tenant (a name from the tenants file; "
    "`default` for the keys of auth.api_keys, `anonymous` without keys, `unknown` for a key that "
    "matched none), status code and OpenAI error code.",
)
TENANT_PROMPT_TOKENS = _ours(
    "tenant_prompt_tokens",
    "counter",
    "short",
    TENANT_LABELS,
    "ingress",
    "Prompt tokens of the tenant's requests that reached the decoder, image tokens excluded.",
)
TENANT_IMAGE_TOKENS = Metric(
    "ray_ministral_tenant_image_tokens",
    "counter",
    "short",
    (*TENANT_LABELS, *SERVE_LABELS),
    "ingress",
    "Image tokens of the tenant's prompts that reached the decoder.",
    absent_until_first_event=True,
)
TENANT_COMPLETION_TOKENS = _ours(
    "tenant_completion_tokens",
    "counter",
    "short",
    TENANT_LABELS,
    "ingress",
    "Completion tokens generated for the tenant, all choices counted.",
)
TENANT_ENCODER_SECONDS = Metric(
    "ray_ministral_tenant_encoder_seconds",
    "counter",
    "s",
    (*TENANT_LABELS, *SERVE_LABELS),
    "ingress",
    "Encoder time spent on the tenant's images (a batch's time shared among its images; cached "
    "images cost none).",
    absent_until_first_event=True,
)
TENANT_REJECTIONS = Metric(
    "ray_ministral_tenant_rejections",
    "counter",
    "short",
    (*TENANT_LABELS, "reason", *SERVE_LABELS),
    "ingress",
    "Requests refused by admission, by tenant and reason: requests_per_minute, tokens_per_minute, "
    "max_concurrent_requests, deadline (it would not finish within the client's timeout), "
    "queue_full (the admission queue was full).",
    absent_until_first_event=True,
)
TENANT_REQUESTS_IN_FLIGHT = _ours(
    "tenant_requests_in_flight",
    "gauge",
    "short",
    TENANT_LABELS,
    "ingress",
    "The tenant's generation requests past authentication and not yet answered, on this replica.",
)
ADMISSION_WAITING = _ours(
    "admission_waiting",
    "gauge",
    "short",
    (),
    "ingress",
    "Requests waiting at this ingress replica's admission gate for a slot (serve/admission.py).",
)
IMAGES_PREPROCESSED = _ours(
    "images_preprocessed", "counter", "short", (), "preprocess", "Images fetched, decoded and templated."
)
PREPROCESS_CACHE_HITS = _ours(
    "preprocess_cache_hits",
    "counter",
    "short",
    (),
    "preprocess",
    "Images whose bytes the preprocess replica had seen: decoded, resized and normalised pixels reused.",
)
PREPROCESS_SECONDS = _ours(
    "preprocess_seconds",
    "histogram",
    "s",
    (),
    "preprocess",
    "Time to preprocess one request with images (fetch, decode, template).",
    STAGE_BOUNDARIES_S,
)
ENCODER_IMAGES_ENCODED = _ours(
    "encoder_images_encoded", "counter", "short", (), "encoder", "Images run through the vision tower."
)
ENCODER_BATCH_SIZE = _ours(
    "encoder_batch_size",
    "histogram",
    "short",
    (),
    "encoder",
    "Distinct images per forward pass of the vision tower.",
    (1, 2, 4, 8, 16, 32, 64),
)
ENCODER_SECONDS = _ours(
    "encoder_seconds",
    "histogram",
    "s",
    (),
    "encoder",
    "Time of one batched forward pass.",
    STAGE_BOUNDARIES_S,
)
ENCODER_CACHE_HITS = _ours(
    "encoder_cache_hits", "counter", "short", (), "encoder", "Images answered from the embedding cache."
)
ENCODER_CACHE_MISSES = _ours(
    "encoder_cache_misses", "counter", "short", (), "encoder", "Images that had to be encoded."
)
ENCODER_CACHE_BYTES = _ours(
    "encoder_cache_bytes", "gauge", "bytes", (), "encoder", "Bytes of image-token embeddings in the cache."
)

# What the decoder and encoder routers (in the ingress replicas) see of each replica they route to.
ROUTER_LABELS = ("stage", "routed_replica")
ROUTER_REPLICA_TOKENS_PER_S = _ours(
    "router_replica_tokens_per_s",
    "gauge",
    "short",
    ROUTER_LABELS,
    "ingress",
    "A replica's measured speed as its router sees it: tokens (decoder) or images (encoder) per "
    "second while it had work.",
)
ROUTER_REPLICA_IN_FLIGHT = _ours(
    "router_replica_in_flight",
    "gauge",
    "short",
    ROUTER_LABELS,
    "ingress",
    "Requests a router has sent a replica and not yet seen finish.",
)
ROUTER_REPLICA_KV_CACHE_USAGE = _ours(
    "router_replica_kv_cache_usage",
    "gauge",
    "percentunit",
    ROUTER_LABELS,
    "ingress",
    "A decoder replica's KV-cache use in its last routing stats (1 = full).",
)
ROUTER_AFFINITY_HITS = Metric(
    "ray_ministral_router_affinity_hits",
    "counter",
    "short",
    ("stage", *SERVE_LABELS),
    "ingress",
    "Requests routed to the replica that held part of them already (the conversation's prefix, "
    "the image's embeddings).",
    absent_until_first_event=True,
)

VLLM_RUNNING = _vllm("num_requests_running", "gauge", "short", "Requests in the engine's running batch.")
VLLM_WAITING = _vllm(
    "num_requests_waiting", "gauge", "short", "Requests waiting for the engine to schedule them."
)
VLLM_KV_CACHE_USAGE = _vllm(
    "kv_cache_usage_perc", "gauge", "percentunit", "Fraction of the KV cache's blocks in use (1 = full)."
)
VLLM_PROMPT_TOKENS = _vllm("prompt_tokens", "counter", "short", "Prompt tokens the engine prefilled.")
VLLM_GENERATION_TOKENS = _vllm("generation_tokens", "counter", "short", "Tokens the engine generated.")
VLLM_TTFT = _vllm(
    "time_to_first_token_seconds",
    "histogram",
    "s",
    "Engine-side time to first token (from the engine's queue).",
)
VLLM_INTER_TOKEN_LATENCY = _vllm(
    "inter_token_latency_seconds", "histogram", "s", "Engine-side time between consecutive tokens."
)
VLLM_E2E_LATENCY = _vllm(
    "e2e_request_latency_seconds", "histogram", "s", "Engine-side duration of a request."
)
VLLM_QUEUE_TIME = _vllm(
    "request_queue_time_seconds", "histogram", "s", "Time requests waited in the engine's queue."
)
VLLM_PREEMPTIONS = Metric(
    "ray_vllm_num_preemptions",
    "counter",
    "short",
    VLLM_LABELS,
    "vllm",
    "Requests preempted because the KV cache ran out (absent until the first preemption).",
    absent_until_first_event=True,
)
VLLM_PREFIX_CACHE_QUERIES = _vllm(
    "prefix_cache_queries", "counter", "short", "Prompt tokens looked up in the prefix cache."
)
VLLM_PREFIX_CACHE_HITS = _vllm(
    "prefix_cache_hits", "counter", "short", "Prompt tokens found in the prefix cache."
)

SERVE_REPLICA_HEALTHY = Metric(
    "ray_serve_deployment_replica_healthy",
    "gauge",
    "short",
    ("application", "deployment", "replica"),
    "ray-serve",
    "1 for each healthy replica of a deployment.",
)
SERVE_PROCESSING = Metric(
    "ray_serve_replica_processing_queries",
    "gauge",
    "short",
    ("application", "deployment", "replica"),
    "ray-serve",
    "Requests a replica is working on: a stage's concurrency, replica by replica.",
)
SERVE_QUEUED = Metric(
    "ray_serve_deployment_queued_queries",
    "gauge",
    "short",
    ("application", "deployment", "handle"),
    "ray-serve",
    "Requests to a stage waiting in a caller's handle for a replica to take them.",
)

CATALOGUE: tuple[Metric, ...] = (
    REQUESTS,
    REQUESTS_IN_FLIGHT,
    REQUEST_DURATION,
    TIME_TO_FIRST_TOKEN,
    TIME_PER_OUTPUT_TOKEN,
    PROMPT_TOKENS,
    GENERATION_TOKENS,
    IMAGE_REQUESTS,
    TENANT_REQUESTS,
    TENANT_PROMPT_TOKENS,
    TENANT_IMAGE_TOKENS,
    TENANT_COMPLETION_TOKENS,
    TENANT_ENCODER_SECONDS,
    TENANT_REJECTIONS,
    TENANT_REQUESTS_IN_FLIGHT,
    ADMISSION_WAITING,
    IMAGES_PREPROCESSED,
    PREPROCESS_CACHE_HITS,
    PREPROCESS_SECONDS,
    ENCODER_IMAGES_ENCODED,
    ENCODER_BATCH_SIZE,
    ENCODER_SECONDS,
    ENCODER_CACHE_HITS,
    ENCODER_CACHE_MISSES,
    ENCODER_CACHE_BYTES,
    ROUTER_REPLICA_TOKENS_PER_S,
    ROUTER_REPLICA_IN_FLIGHT,
    ROUTER_REPLICA_KV_CACHE_USAGE,
    ROUTER_AFFINITY_HITS,
    VLLM_RUNNING,
    VLLM_WAITING,
    VLLM_KV_CACHE_USAGE,
    VLLM_PROMPT_TOKENS,
    VLLM_GENERATION_TOKENS,
    VLLM_TTFT,
    VLLM_INTER_TOKEN_LATENCY,
    VLLM_QUEUE_TIME,
    VLLM_PREEMPTIONS,
    VLLM_PREFIX_CACHE_QUERIES,
    VLLM_PREFIX_CACHE_HITS,
    SERVE_REPLICA_HEALTHY,
    SERVE_PROCESSING,
    SERVE_QUEUED,
)


def ray_metric(metric: Metric):
    """The Ray Serve metric object for one of this service's entries."""
    from ray.serve import metrics

    name = metric.name.removeprefix("ray_")
    tags = metric.own_labels or None
    if metric.kind == "counter":
        return metrics.Counter(name, description=metric.description, tag_keys=tags)
    if metric.kind == "histogram":
        return metrics.Histogram(
            name, description=metric.description, boundaries=list(metric.boundaries), tag_keys=tags
        )
    return metrics.Gauge(name, description=metric.description, tag_keys=tags)


def report_interval_s() -> float:
    # Ray's own setting (default 10 s, floored at 1 s by Ray).
    interval_ms = os.environ.get("RAY_metrics_report_interval_ms", "10000")  # noqa: SIM112 (Ray spells it so)
    return max(1.0, float(interval_ms) / 1000)


_kept_gauges: list[Callable[[], None]] = []
_keeper_lock = threading.Lock()
_keeper: threading.Thread | None = None


def keep_alive(set_again: Callable[[], None]) -> None:
    """Call `set_again` every half report interval from now on, so that its gauge stays on /metrics.

    Ray 2.60 exports a gauge only when `set()` is called and drops it from
    the Prometheus endpoint two report intervals later, so a value that
    stops changing (an idle cache's size, zero requests in flight, an idle
    engine's running requests) would vanish from Grafana. One thread per
    process sets every kept gauge again.
    """
    global _keeper
    with _keeper_lock:
        _kept_gauges.append(set_again)
        if _keeper is None:
            _keeper = threading.Thread(target=_keep_gauges, name="gauge-keeper", daemon=True)
            _keeper.start()


def _keep_gauges() -> None:
    period = report_interval_s() / 2
    while True:
        time.sleep(period)
        with _keeper_lock:
            kept = list(_kept_gauges)
        for set_again in kept:
            try:
                set_again()
            except Exception:
                # One failing read must not stop the others' gauges.
                logger.exception("setting a gauge again failed")


class LiveGauge:
    """A gauge whose value is read from `read` whenever it is set, kept on /metrics while idle."""

    def __init__(self, metric: Metric, read: Callable[[], float]):
        self._gauge = ray_metric(metric)
        self._read = read
        keep_alive(self.update)

    def update(self) -> None:
        self._gauge.set(self._read())
