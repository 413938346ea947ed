"""The dashboards and alert rules: in step with their code, reading only catalogued series."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from dashboards.build import DASHBOARDS, FOLDER, generated_files
from serve.metrics import CATALOGUE

SERIES = re.compile(r"\bray_[A-Za-z_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def catalogued(series: str) -> bool:
    for metric in CATALOGUE:
        if series == metric.series:
            return True
        if metric.kind == "histogram" and series in {metric.name + suffix for suffix in HISTOGRAM_SUFFIXES}:
            return True
    return False


def panel_queries(board: dict) -> list[str]:
    return [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]


# Two Helm releases (two namespaces) in one cluster must never add up to one line or one
# alert. A small reading of PromQL, enough for these files: each aggregation with its
# `by`/`without` clause (the prefix form, the one they use), each series with its matchers.
AGGREGATION = re.compile(
    r"\b(?P<op>sum|min|max|avg|group|stddev|stdvar|count|count_values|topk|bottomk|quantile)\s*"
    r"(?:(?P<clause>by|without)\s*\((?P<labels>[^)]*)\)\s*)?\("
)
SELECTOR = re.compile(r"\b(?P<series>ray_[A-Za-z0-9_]+)(?P<matchers>\{[^}]*\})?")
NAMESPACE_MATCHER = 'namespace=~"$namespace"'


def merging_aggregations(expr: str, *, totals: bool) -> list[str]:
    """The aggregations of `expr` that would add two namespaces' series together.

    With `totals`, an aggregation over everything the selectors chose (no clause, or only a
    histogram's `le`) is allowed: a dashboard's `$namespace` variable has already picked the
    releases it adds up. Without (alert rules), every aggregation must keep `namespace`.
    """
    merging = []
    for match in AGGREGATION.finditer(expr):
        labels = {label.strip() for label in (match["labels"] or "").split(",") if label.strip()}
        if match["clause"] == "without":
            kept = "namespace" not in labels
        elif match["clause"] == "by":
            kept = "namespace" in labels or (totals and labels == {"le"})
        else:
            kept = totals
        if not kept:
            merging.append(match.group(0))
    return merging


def selectors_without_namespace(expr: str) -> list[str]:
    return [
        match.group(0)
        for match in SELECTOR.finditer(expr)
        if NAMESPACE_MATCHER not in (match["matchers"] or "")
    ]


def alert_expressions() -> list[str]:
    rules = yaml.safe_load((FOLDER / "alerts.yaml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def dashboard_targets() -> list[tuple[str, dict]]:
    return [
        (f"{spec.uid}: {panel['title']}", target)
        for spec in DASHBOARDS
        for panel in json.loads(spec.file.read_text())["panels"]
        for target in panel.get("targets", [])
    ]


def test_the_committed_files_are_what_the_code_builds():
    stale = [path.name for path, text in generated_files().items() if path.read_text() != text]
    assert not stale, f"run `ministral-serve dashboards`: {stale} differ from dashboards/build.py"


def test_the_catalogue_names_each_series_once_in_rays_spelling():
    names = [metric.name for metric in CATALOGUE]
    assert len(names) == len(set(names))
    for metric in CATALOGUE:
        assert re.fullmatch(r"ray_[a-z][a-z0-9_]*", metric.name), metric.name
        assert not metric.name.endswith("_total"), "Ray adds _total to counters itself"
        assert metric.description and metric.unit
        if metric.source not in ("vllm", "ray-serve"):
            # Ours: a histogram without boundaries would get Ray's default ones.
            assert (metric.kind == "histogram") == bool(metric.boundaries), metric.name


@pytest.mark.parametrize("spec", DASHBOARDS, ids=lambda spec: spec.uid)
def test_each_panel_says_what_it_shows_in_units_and_reads_catalogued_series(spec):
    board = json.loads(spec.file.read_text())
    assert board["uid"] == spec.uid
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert list(variables) == ["datasource", "namespace", "application", "model"]
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "application", "model"):
        # All is `.*`: it matches an absent label too (a Prometheus outside Kubernetes has no namespace).
        variable = variables[name]
        assert variable["type"] == "query" and variable["datasource"]["uid"] == "${datasource}", name
        assert variable["multi"] and variable["includeAll"] and variable["allValue"] == ".*", name
        assert variable["current"]["value"] == "$__all", name
    # The namespaces come from a gauge Ray Serve always exports; the choices below follow them.
    assert variables["namespace"]["query"] == "label_values(ray_serve_deployment_replica_healthy, namespace)"
    for name in ("application", "model"):
        assert NAMESPACE_MATCHER in variables[name]["query"], name
    panels = [panel for panel in board["panels"] if panel["type"] != "row"]
    assert len({panel["id"] for panel in board["panels"]}) == len(board["panels"])
    for panel in panels:
        assert panel["description"], panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            # Every query follows the dashboard's application or model choice.
            assert "$application" in expr or "$model" in expr, (panel["title"], expr)
            unknown = [name for name in SERIES.findall(expr) if not catalogued(name)]
            assert not unknown, (panel["title"], unknown)


def test_the_dashboards_have_distinct_uids_and_files():
    assert len({spec.uid for spec in DASHBOARDS}) == len(DASHBOARDS)
    assert {spec.file.name for spec in DASHBOARDS} == {path.name for path in FOLDER.glob("*.json")}


def test_every_dashboard_query_keeps_releases_apart():
    for where, target in dashboard_targets():
        expr = target["expr"]
        # Every series follows the namespace variable...
        assert not selectors_without_namespace(expr), (where, expr)
        # ...and every breakdown keeps namespace, with the namespace in its legend.
        assert not merging_aggregations(expr, totals=True), (where, expr)
        if "by (namespace" in expr:
            assert "{{namespace}}" in target["legendFormat"], (where, target["legendFormat"])


def test_every_alert_rule_aggregates_by_namespace():
    expressions = alert_expressions()
    assert expressions
    for expr in expressions:
        assert AGGREGATION.search(expr), expr
        assert not merging_aggregations(expr, totals=False), expr


def test_the_namespace_checks_catch_a_query_or_rule_that_loses_it():
    # Each query or rule with `namespace` taken out of one place fails the checks above.
    for expr in alert_expressions():
        lost = expr.replace("namespace, ", "", 1)
        assert lost != expr and merging_aggregations(lost, totals=False), lost
    grouped = 0
    for where, target in dashboard_targets():
        expr = target["expr"]
        lost = expr.replace(NAMESPACE_MATCHER + ", ", "", 1)
        assert lost != expr and selectors_without_namespace(lost), (where, lost)
        if "by (namespace, " in expr:
            grouped += 1
            lost = expr.replace("by (namespace, ", "by (", 1)
            assert merging_aggregations(lost, totals=True), (where, lost)
            assert merging_aggregations(
                expr.replace(" by (namespace, ", " without (namespace, ", 1), totals=True
            )
    assert grouped >= 10


def test_alert_rules_read_only_catalogued_series():
    rules = yaml.safe_load((FOLDER / "alerts.yaml").read_text())
    expressions = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    assert len(expressions) == 6
    for expr in expressions:
        assert SERIES.findall(expr)
        assert all(catalogued(name) for name in SERIES.findall(expr)), expr


PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool (Debian's prometheus) is not installed; scripts/install.sh installs it"
)


def promtool(*args: str, cwd: Path = FOLDER) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


@needs_promtool
def test_promtool_accepts_the_rules_and_the_prometheus_config():
    checked = promtool("check", "rules", "alerts.yaml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 6 rules found" in checked.stdout
    config = promtool("check", "config", "prometheus.yaml")
    assert config.returncode == 0, config.stdout + config.stderr


@needs_promtool
def test_promtool_unit_tests_of_the_alerts_pass():
    tested = promtool("test", "rules", "alerts_test.yaml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


@needs_promtool
@pytest.mark.parametrize(
    ("original", "loosened"),
    [
        ("> 0.05", "> 0.2"),
        ("> 2\n", "> 10\n"),
        ("> 0.9", "> 0.99"),
        ("== 0", "== -1"),
        ("> 10\n", "> 20\n"),
        ("> 16\n", "> 20\n"),
    ],
)
def test_the_alert_unit_tests_catch_a_wrong_threshold(tmp_path, original, loosened):
    rules = (FOLDER / "alerts.yaml").read_text()
    assert rules.count(original) == 1
    (tmp_path / "alerts.yaml").write_text(rules.replace(original, loosened))
    shutil.copy(FOLDER / "alerts_test.yaml", tmp_path)
    tested = promtool("test", "rules", "alerts_test.yaml", cwd=tmp_path)
    assert tested.returncode != 0
    assert "FAILED" in tested.stdout + tested.stderr


@needs_promtool
@pytest.mark.parametrize(
    "rule",
    [
        "sum by (namespace, application) (rate(ray_ministral_requests_total",
        "sum by (namespace, application, deployment) (ray_serve_deployment_replica_healthy)",
    ],
)
def test_the_alert_unit_tests_catch_two_releases_merged(tmp_path, rule):
    # Without `namespace`, team-a's and team-b's series (same application) add up.
    rules = (FOLDER / "alerts.yaml").read_text()
    assert rule in rules
    (tmp_path / "alerts.yaml").write_text(rules.replace(rule, rule.replace("namespace, ", "")))
    shutil.copy(FOLDER / "alerts_test.yaml", tmp_path)
    tested = promtool("test", "rules", "alerts_test.yaml", cwd=tmp_path)
    assert tested.returncode != 0
    assert "FAILED" in tested.stdout + tested.stderr
