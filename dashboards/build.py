"""The Grafana dashboards, as code (grafana-foundation-sdk), and their JSON files.

`ministral-serve dashboards` writes one JSON file per dashboard into this
folder and the metric catalogue's table into README.md; `--check` fails when
the committed files differ from what this module builds. Every query names
its metrics through serve/metrics.py's catalogue and filters on the
dashboard's variables: `$datasource`, `$namespace` (the Kubernetes namespace
Prometheus's scrape gave the series, one per Helm release), `$application`
(Ray Serve application) and `$model` (the served model name).

Releases stay apart: every selector matches `namespace=~"$namespace"`, and
every breakdown (`by (...)` other than a histogram's `le`) keeps `namespace`,
so two releases' replicas and stages never add up to one line. Without
Kubernetes the series have no namespace: the variable's All (`.*`) matches
the empty label and the legends' `{{namespace}}` prints nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from serve import metrics as m

FOLDER = Path(__file__).parent
README = FOLDER / "README.md"
CATALOGUE_BEGIN = "<!-- catalogue: written by `ministral-serve dashboards` -->"
CATALOGUE_END = "<!-- end of catalogue -->"

RATE = "[$__rate_interval]"
NAMESPACE = 'namespace=~"$namespace"'
APP = 'application=~"$application"'
MODEL = 'model=~"$model"'
OURS = f"{{{NAMESPACE}, {APP}, {MODEL}}}"
# vLLM's series carry no application label: the namespace and the model pick them.
VLLM = f'{{{NAMESPACE}, model_name=~"$model"}}'
SERVE = f"{{{NAMESPACE}, {APP}}}"
TOKENS_PER_S = "suffix: tok/s"
# Seconds of work per second of wall time: 1 = one replica busy the whole time.
SECONDS_PER_S = "suffix: s/s"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class PanelSpec:
    title: str
    description: str
    unit: str
    queries: tuple[Query, ...]


@dataclass(frozen=True)
class DashboardSpec:
    uid: str
    title: str
    description: str
    rows: tuple[tuple[str, tuple[PanelSpec, ...]], ...]

    @property
    def file(self) -> Path:
        return FOLDER / f"{self.uid.removeprefix('ministral-')}.json"

    def panels(self) -> list[PanelSpec]:
        return [panel for _, panels in self.rows for panel in panels]


def apart(by: str) -> str:
    """A breakdown's labels with `namespace` first: two releases' lines never merge."""
    return f"namespace, {by}"


def legend(labels: str) -> str:
    """A breakdown's legend: its own labels, then the namespace (empty without Kubernetes)."""
    return f"{labels} {{{{namespace}}}}"


def grouped(op: str, by: str, metric: m.Metric, selector: str) -> str:
    return f"{op} by ({apart(by)}) ({metric.series}{selector})"


def rate(series: str, selector: str, by: str = "") -> str:
    grouping = f" by ({apart(by)})" if by else ""
    return f"sum{grouping} (rate({series}{selector}{RATE}))"


def quantile(q: float, metric: m.Metric, selector: str, by: str = "") -> str:
    grouping = ", ".join(("le", apart(by))) if by else "le"
    return f"histogram_quantile({q}, sum by ({grouping}) (rate({metric.buckets}{selector}{RATE})))"


def percentiles(metric: m.Metric, selector: str) -> tuple[Query, ...]:
    return tuple(Query(quantile(q, metric, selector), f"p{round(q * 100)}") for q in (0.5, 0.95, 0.99))


def with_status(status_pattern: str) -> str:
    return "{" + f'{NAMESPACE}, {APP}, {MODEL}, status=~"{status_pattern}"' + "}"


def or_zero(expr: str) -> str:
    # A counter that has never moved (no errors yet) has no series: show 0, not "No data".
    # Parenthesised whole: `or` binds more loosely than arithmetic in PromQL.
    return f"(({expr}) or vector(0))"


REPLICAS_PER_STAGE = PanelSpec(
    "Healthy replicas per stage",
    "Replicas of each deployment that pass their health checks (Ray Serve's own gauge).",
    "short",
    (Query(grouped("sum", "deployment", m.SERVE_REPLICA_HEALTHY, SERVE), legend("{{deployment}}")),),
)
KV_CACHE = PanelSpec(
    "KV-cache use per decoder replica",
    "Fraction of each engine's KV-cache blocks in use (vLLM). Near 1, new requests wait and "
    "running ones may be preempted.",
    "percentunit",
    (Query(grouped("max", "ReplicaId", m.VLLM_KV_CACHE_USAGE, VLLM), legend("{{ReplicaId}}")),),
)

OVERVIEW = DashboardSpec(
    "ministral-overview",
    "Ministral serve / Overview",
    "Throughput, concurrency, latency and errors of the whole service, as clients see it.",
    (
        (
            "Traffic",
            (
                PanelSpec(
                    "Tokens per second",
                    "Prompt tokens sent to the decoder and completion tokens sent back to clients, "
                    "per second, counted at the ingress.",
                    TOKENS_PER_S,
                    (
                        Query(rate(m.PROMPT_TOKENS.series, OURS), "in (prompt)"),
                        Query(rate(m.GENERATION_TOKENS.series, OURS), "out (generated)"),
                    ),
                ),
                PanelSpec(
                    "Requests in flight",
                    "HTTP requests the ingress replicas have received and not finished answering; "
                    "streams count until their last event.",
                    "short",
                    (Query(f"sum ({m.REQUESTS_IN_FLIGHT.series}{SERVE})", "in flight"),),
                ),
                PanelSpec(
                    "Request rate by route",
                    "Requests answered per second, by API route.",
                    "reqps",
                    (Query(rate(m.REQUESTS.series, OURS, by="route"), legend("{{route}}")),),
                ),
                PanelSpec(
                    "Error rate",
                    "Share of requests answered with a client error (4xx) or a server error (5xx).",
                    "percentunit",
                    tuple(
                        Query(
                            f"{or_zero(rate(m.REQUESTS.series, with_status(status)))} "
                            f"/ {rate(m.REQUESTS.series, OURS)}",
                            label,
                        )
                        for status, label in (("4..", "4xx"), ("5..", "5xx"))
                    ),
                ),
            ),
        ),
        (
            "Latency",
            (
                PanelSpec(
                    "Time to first token",
                    "From a request's arrival at the ingress to its first token, percentiles over "
                    "the rate interval: templating, images, queueing and prefill included.",
                    "s",
                    percentiles(m.TIME_TO_FIRST_TOKEN, OURS),
                ),
                PanelSpec(
                    "Time per output token",
                    "Per request, the time between its first and last tokens over the tokens after "
                    "the first; percentiles over the rate interval.",
                    "s",
                    percentiles(m.TIME_PER_OUTPUT_TOKEN, OURS),
                ),
            ),
        ),
        ("Capacity", (REPLICAS_PER_STAGE, KV_CACHE)),
        # Last, so that the panels above keep their ids (links with `viewPanel=` survive).
        (
            "Tenants",
            (
                PanelSpec(
                    "Request rate per tenant by status class",
                    "Generation requests answered per second for each tenant (from the tenants file; "
                    "`default`, `anonymous` or `unknown` without one), by status class. A class "
                    "with no requests yet has no line.",
                    "reqps",
                    tuple(
                        Query(
                            rate(m.TENANT_REQUESTS.series, with_status(status), by="tenant"),
                            legend(f"{{{{tenant}}}} {label}"),
                        )
                        for status, label in (("2..", "2xx"), ("4..", "4xx"), ("5..", "5xx"))
                    ),
                ),
                PanelSpec(
                    "Tokens per second per tenant",
                    "Each tenant's prompt tokens (image tokens apart) and image tokens that reached "
                    "the decoder, and completion tokens generated for it, per second.",
                    TOKENS_PER_S,
                    tuple(
                        Query(rate(metric.series, OURS, by="tenant"), legend(f"{{{{tenant}}}} {label}"))
                        for metric, label in (
                            (m.TENANT_PROMPT_TOKENS, "prompt"),
                            (m.TENANT_IMAGE_TOKENS, "image"),
                            (m.TENANT_COMPLETION_TOKENS, "completion"),
                        )
                    ),
                ),
                PanelSpec(
                    "Encoder time per tenant",
                    "Encoder seconds spent per second on each tenant's images (a batch's time shared "
                    "among its images; cached images cost none). 1 s/s: one encoder replica busy "
                    "the whole time.",
                    SECONDS_PER_S,
                    (Query(rate(m.TENANT_ENCODER_SECONDS.series, OURS, by="tenant"), legend("{{tenant}}")),),
                ),
                PanelSpec(
                    "Rejections per second per tenant",
                    "Requests admission refused, per second, by tenant and reason (requests or "
                    "tokens per minute, concurrent requests, deadline, full queue).",
                    "reqps",
                    (
                        Query(
                            or_zero(rate(m.TENANT_REJECTIONS.series, OURS, by="tenant, reason")),
                            legend("{{tenant}} {{reason}}"),
                        ),
                    ),
                ),
                PanelSpec(
                    "Requests in flight per tenant",
                    "Each tenant's generation requests past authentication and not yet answered, "
                    "summed over the ingress replicas.",
                    "short",
                    (
                        Query(
                            grouped("sum", "tenant", m.TENANT_REQUESTS_IN_FLIGHT, OURS), legend("{{tenant}}")
                        ),
                    ),
                ),
                PanelSpec(
                    "Requests waiting for admission",
                    "Requests waiting at the ingress replicas' admission gates for a slot, summed "
                    "over the replicas. Growing: tenants' limits or the service's capacity hold "
                    "requests back.",
                    "short",
                    (Query(f"sum ({m.ADMISSION_WAITING.series}{SERVE})", "waiting"),),
                ),
            ),
        ),
    ),
)

STAGES = DashboardSpec(
    "ministral-stages",
    "Ministral serve / Stages",
    "Each stage on its own: preprocess (images), encoder (vision tower and its cache), decoder (vLLM).",
    (
        (
            "Concurrency",
            (
                PanelSpec(
                    "Requests in progress per stage",
                    "Requests each stage's replicas are working on (Ray Serve's per-replica gauge, "
                    "summed by deployment).",
                    "short",
                    (
                        Query(
                            grouped("sum", "deployment", m.SERVE_PROCESSING, SERVE), legend("{{deployment}}")
                        ),
                    ),
                ),
                PanelSpec(
                    "Requests queued per stage",
                    "Requests waiting in a caller's handle for a replica of the stage to take them. "
                    "Growing: the stage needs more replicas.",
                    "short",
                    (Query(grouped("sum", "deployment", m.SERVE_QUEUED, SERVE), legend("{{deployment}}")),),
                ),
                REPLICAS_PER_STAGE,
            ),
        ),
        (
            "Preprocess",
            (
                PanelSpec(
                    "Images preprocessed per second",
                    "Images fetched, decoded and templated by the preprocess stage.",
                    "short",
                    (Query(rate(m.IMAGES_PREPROCESSED.series, SERVE), "images/s"),),
                ),
                PanelSpec(
                    "Preprocess time",
                    "Time to fetch, decode and template the images of one request.",
                    "s",
                    percentiles(m.PREPROCESS_SECONDS, SERVE),
                ),
            ),
        ),
        (
            "Encoder",
            (
                PanelSpec(
                    "Encoder batch size",
                    "Distinct images per forward pass of the vision tower: median and 95th "
                    "percentile. Larger batches use the accelerator better.",
                    "short",
                    (
                        Query(quantile(0.5, m.ENCODER_BATCH_SIZE, SERVE), "p50"),
                        Query(quantile(0.95, m.ENCODER_BATCH_SIZE, SERVE), "p95"),
                    ),
                ),
                PanelSpec(
                    "Embedding cache hit rate",
                    "Share of images answered from the encoder's embedding cache instead of the "
                    "vision tower.",
                    "percentunit",
                    (
                        Query(
                            f"{rate(m.ENCODER_CACHE_HITS.series, SERVE)}"
                            f" / ({rate(m.ENCODER_CACHE_HITS.series, SERVE)}"
                            f" + {rate(m.ENCODER_CACHE_MISSES.series, SERVE)})",
                            "hit rate",
                        ),
                    ),
                ),
                PanelSpec(
                    "Embedding cache size",
                    "Bytes of image-token embeddings each encoder replica holds.",
                    "bytes",
                    (Query(grouped("sum", "replica", m.ENCODER_CACHE_BYTES, SERVE), legend("{{replica}}")),),
                ),
                PanelSpec(
                    "Encoder forward-pass time",
                    "Time of one batched forward pass of the vision tower.",
                    "s",
                    percentiles(m.ENCODER_SECONDS, SERVE),
                ),
            ),
        ),
        (
            "Decoder (vLLM)",
            (
                PanelSpec(
                    "Engine requests: running and waiting",
                    "Requests in the engines' running batches and waiting to be scheduled (vLLM). "
                    "Waiting requests mean the engines are full.",
                    "short",
                    (
                        Query(f"sum ({m.VLLM_RUNNING.series}{VLLM})", "running"),
                        Query(f"sum ({m.VLLM_WAITING.series}{VLLM})", "waiting"),
                    ),
                ),
                PanelSpec(
                    "Engine tokens per second",
                    "Prompt tokens prefilled and tokens generated by the engines (vLLM).",
                    TOKENS_PER_S,
                    (
                        Query(rate(m.VLLM_PROMPT_TOKENS.series, VLLM), "prefill"),
                        Query(rate(m.VLLM_GENERATION_TOKENS.series, VLLM), "generated"),
                    ),
                ),
                PanelSpec(
                    "Engine latency (p95)",
                    "Engine-side 95th percentiles: time to first token, time between tokens, time in "
                    "the engine's queue (vLLM).",
                    "s",
                    (
                        Query(quantile(0.95, m.VLLM_TTFT, VLLM), "time to first token"),
                        Query(quantile(0.95, m.VLLM_INTER_TOKEN_LATENCY, VLLM), "inter-token"),
                        Query(quantile(0.95, m.VLLM_QUEUE_TIME, VLLM), "queue"),
                    ),
                ),
                PanelSpec(
                    "Prefix-cache hit rate",
                    "Share of prompt tokens whose KV the engines found in their prefix cache.",
                    "percentunit",
                    (
                        Query(
                            f"{or_zero(rate(m.VLLM_PREFIX_CACHE_HITS.series, VLLM))}"
                            f" / {rate(m.VLLM_PREFIX_CACHE_QUERIES.series, VLLM)}",
                            "hit rate",
                        ),
                    ),
                ),
                PanelSpec(
                    "Preemptions per second",
                    "Requests the engines preempted because the KV cache ran out (vLLM).",
                    "short",
                    (Query(or_zero(rate(m.VLLM_PREEMPTIONS.series, VLLM)), "preemptions/s"),),
                ),
                KV_CACHE,
            ),
        ),
    ),
)

REPLICAS = DashboardSpec(
    "ministral-replicas",
    "Ministral serve / Replicas",
    "Throughput and concurrency replica by replica, the figures a router balances on.",
    (
        (
            "Decoder replicas",
            (
                PanelSpec(
                    "Generated tokens per second per decoder replica",
                    "Each decoder replica's generation throughput (vLLM's token counter).",
                    TOKENS_PER_S,
                    (
                        Query(
                            rate(m.VLLM_GENERATION_TOKENS.series, VLLM, by="ReplicaId"),
                            legend("{{ReplicaId}}"),
                        ),
                    ),
                ),
                PanelSpec(
                    "Running requests per decoder replica",
                    "Requests in each engine's running batch.",
                    "short",
                    (Query(grouped("sum", "ReplicaId", m.VLLM_RUNNING, VLLM), legend("{{ReplicaId}}")),),
                ),
                PanelSpec(
                    "Waiting requests per decoder replica",
                    "Requests each engine has accepted but not yet scheduled.",
                    "short",
                    (Query(grouped("sum", "ReplicaId", m.VLLM_WAITING, VLLM), legend("{{ReplicaId}}")),),
                ),
                KV_CACHE,
            ),
        ),
        (
            "What the routers see",
            (
                PanelSpec(
                    "Speed per replica, as its router measures it",
                    "Decoder: tokens per second while busy; encoder: images per second while busy. "
                    "A replica slower than its peers gets less work.",
                    "short",
                    (
                        Query(
                            grouped("max", "stage, routed_replica", m.ROUTER_REPLICA_TOKENS_PER_S, SERVE),
                            legend("{{stage}} {{routed_replica}}"),
                        ),
                    ),
                ),
                PanelSpec(
                    "Requests in flight per replica, as routed",
                    "Requests the routers have sent each replica and not yet seen finish.",
                    "short",
                    (
                        Query(
                            grouped("sum", "stage, routed_replica", m.ROUTER_REPLICA_IN_FLIGHT, SERVE),
                            legend("{{stage}} {{routed_replica}}"),
                        ),
                    ),
                ),
                PanelSpec(
                    "KV-cache use per decoder replica, as routed",
                    "From each replica's routing stats: a replica near full is tried last.",
                    "percentunit",
                    (
                        Query(
                            grouped("max", "routed_replica", m.ROUTER_REPLICA_KV_CACHE_USAGE, SERVE),
                            legend("{{routed_replica}}"),
                        ),
                    ),
                ),
                PanelSpec(
                    "Affinity hits per second",
                    "Requests sent to the replica that held their prefix (decoder) or images (encoder).",
                    "short",
                    (
                        Query(
                            or_zero(rate(m.ROUTER_AFFINITY_HITS.series, SERVE, by="stage")),
                            legend("{{stage}}"),
                        ),
                    ),
                ),
            ),
        ),
        (
            "Every replica",
            (
                PanelSpec(
                    "Requests in progress per replica",
                    "Requests each replica of each stage is working on (Ray Serve's gauge).",
                    "short",
                    (
                        Query(
                            grouped("sum", "deployment, replica", m.SERVE_PROCESSING, SERVE),
                            legend("{{deployment}} {{replica}}"),
                        ),
                    ),
                ),
                PanelSpec(
                    "Tokens sent per second per ingress replica",
                    "Completion tokens each ingress replica streamed back to clients.",
                    TOKENS_PER_S,
                    (Query(rate(m.GENERATION_TOKENS.series, OURS, by="replica"), legend("{{replica}}")),),
                ),
            ),
        ),
    ),
)

DASHBOARDS = (OVERVIEW, STAGES, REPLICAS)

PANEL_WIDTH, PANEL_HEIGHT, GRID_WIDTH = 12, 8, 24


def dashboard_json(spec: DashboardSpec) -> dict:
    """The dashboard as Grafana's JSON model, built with grafana-foundation-sdk."""
    from grafana_foundation_sdk.builders import dashboard, prometheus, timeseries
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableOption, VariableRefresh

    datasource = DataSourceRef(type_val="prometheus", uid="${datasource}")
    board = (
        dashboard.Dashboard(spec.title)
        .uid(spec.uid)
        .description(spec.description)
        .tags(["ministral-serve"])
        .refresh("10s")
        .time("now-30m", "now")
        .with_variable(dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus"))
    )
    # Namespace first (one per Helm release on Kubernetes; none elsewhere, where All's `.*`
    # matches the absent label), then the application and model found in the chosen namespaces.
    for name, label, series, key in (
        ("namespace", "Namespace", m.SERVE_REPLICA_HEALTHY.series, "namespace"),
        ("application", "Application", f"{m.SERVE_REPLICA_HEALTHY.series}{{{NAMESPACE}}}", "application"),
        ("model", "Model", f"{m.VLLM_RUNNING.series}{{{NAMESPACE}}}", "model_name"),
    ):
        board = board.with_variable(
            dashboard.QueryVariable(name)
            .label(label)
            .datasource(datasource)
            .query(f"label_values({series}, {key})")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .multi(True)
            .include_all(True)
            .all_value(".*")
            .current(VariableOption(text="All", value="$__all"))
        )
    # Stable ids: links to a panel (`viewPanel=`) survive regeneration.
    panel_id = 0
    for row_title, panels in spec.rows:
        panel_id += 1
        board = board.with_row(dashboard.Row(row_title).id(panel_id))
        for panel in panels:
            panel_id += 1
            series = timeseries.Panel().id(panel_id).title(panel.title).description(panel.description)
            series = series.unit(panel.unit).datasource(datasource).height(PANEL_HEIGHT).span(PANEL_WIDTH)
            for ref_id, query in zip("ABCDEFGH", panel.queries, strict=False):
                series = series.with_target(
                    prometheus.Dataquery().expr(query.expr).legend_format(query.legend).ref_id(ref_id)
                )
            board = board.with_panel(series)
    return json.loads(JSONEncoder(sort_keys=True, indent=2).encode(board.build()))


def dashboard_text(spec: DashboardSpec) -> str:
    return json.dumps(dashboard_json(spec), indent=2, sort_keys=True) + "\n"


def catalogue_table() -> str:
    lines = [
        "| Series | Kind | Unit | Labels | From | Meaning |",
        "|---|---|---|---|---|---|",
    ]
    for metric in m.CATALOGUE:
        lines.append(
            f"| `{metric.series}` | {metric.kind} | {metric.unit} | {', '.join(metric.labels)} "
            f"| {metric.source} | {metric.description} |"
        )
    return "\n".join(lines)


def readme_text(current: str) -> str:
    """README.md with its catalogue table rewritten from serve/metrics.py."""
    head, _, rest = current.partition(CATALOGUE_BEGIN)
    _, _, tail = rest.partition(CATALOGUE_END)
    return f"{head}{CATALOGUE_BEGIN}\n{catalogue_table()}\n{CATALOGUE_END}{tail}"


def generated_files() -> dict[Path, str]:
    files = {spec.file: dashboard_text(spec) for spec in DASHBOARDS}
    files[README] = readme_text(README.read_text())
    return files
