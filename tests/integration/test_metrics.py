"""The service's metrics as an operator reads them: a real Prometheus scraping the
running application while text and image traffic flows, every dashboard panel's
query evaluated through Prometheus' HTTP API, and `ministral-serve top` in a real
terminal (tmux)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from dashboards.build import DASHBOARDS, FOLDER
from serve.metrics import CATALOGUE
from tests.image_server import data_url, image_bytes
from tests.integration.conftest import APP_NAME
from tests.integration.scrape import scrape, total
from tests.polling import wait_for
from tests.ports import free_port

pytestmark = pytest.mark.slow

PROMETHEUS = shutil.which("prometheus")
TMUX = shutil.which("tmux")
# Ray's endpoint takes a second or so to answer on two busy cores: a scrape
# must not time out (Prometheus caps its timeout at the interval).
SCRAPE_INTERVAL_S = 2
# What Grafana's $__rate_interval comes to here: several scrapes per window.
RATE_INTERVAL = "20s"
TRAFFIC_S = 15.0
STORY = "Once upon a time, in a land far away, there lived a curious engineer. " * 40


@dataclass
class Prometheus:
    url: str

    def query(self, expr: str, at: float) -> list[dict]:
        return self._result("query", {"query": expr, "time": at})

    def query_range(self, expr: str, start: float, end: float) -> list[dict]:
        params = {"query": expr, "start": start, "end": end, "step": SCRAPE_INTERVAL_S}
        return self._result("query_range", params)

    def _result(self, endpoint: str, params: dict) -> list[dict]:
        body = httpx.get(f"{self.url}/api/v1/{endpoint}", params=params, timeout=30).json()
        assert body["status"] == "success", (params, body)
        return body["data"]["result"]

    def value(self, expr: str, at: float) -> float:
        result = self.query(expr, at)
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])


@pytest.fixture(scope="module")
def prometheus(service, tmp_path_factory):
    """Prometheus with the committed config (dashboards/prometheus.yaml), scraping every 2 s.

    Ray writes its service-discovery file only where its dashboard runs (the
    suite's Ray has none), so the test writes the file itself, in Ray's
    format, naming the suite's metrics endpoint on 127.0.0.1.
    """
    if PROMETHEUS is None:
        pytest.skip("prometheus (Debian's package) is not installed; scripts/install.sh installs it")
    workdir = tmp_path_factory.mktemp("prometheus")
    metrics_address = service.metrics_url.removeprefix("http://").removesuffix("/metrics")
    discovery = workdir / "prom_metrics_service_discovery.json"
    discovery.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": [metrics_address]}]))
    config = yaml.safe_load((FOLDER / "prometheus.yaml").read_text())
    config["global"] |= {
        "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
        "scrape_timeout": f"{SCRAPE_INTERVAL_S}s",
        "evaluation_interval": f"{SCRAPE_INTERVAL_S}s",
    }
    config["rule_files"] = [str(FOLDER / name) for name in config["rule_files"]]
    config["scrape_configs"][0]["file_sd_configs"][0]["files"] = [str(discovery)]
    (workdir / "prometheus.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={workdir / 'prometheus.yaml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            # A series counts as present only if a scrape within the last three had it,
            # not any in the last five minutes (the default): the warm-up's series
            # cannot stand in for ones that vanished while traffic flowed.
            f"--query.lookback-delta={3 * SCRAPE_INTERVAL_S}s",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(workdir / "prometheus.log").open("w"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, (workdir / "prometheus.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "Prometheus did not become ready in 60 s"
            time.sleep(0.5)
        yield Prometheus(url)
    finally:
        process.terminate()
        process.wait(timeout=30)


@dataclass
class Traffic:
    """Text streams, whole answers, completions and image requests, until stopped."""

    service: object
    tokens_received: int = 0
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _count(self, completion_tokens: int) -> None:
        with self._lock:
            self.tokens_received += completion_tokens
            self.requests += 1

    def _text_streams(self, client) -> None:
        while not self._stop.is_set():
            stream = client.chat.completions.create(
                model=self.service.model,
                messages=[{"role": "user", "content": "Count to twenty."}],
                max_tokens=24,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            usage = [chunk.usage for chunk in stream if chunk.usage is not None]
            self._count(usage[-1].completion_tokens)

    def _whole_answers(self, client) -> None:
        image = data_url(image_bytes((56, 56), color=(10, 200, 30)))
        while not self._stop.is_set():
            chat = client.chat.completions.create(
                model=self.service.model,
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What is this?"},
                            {"type": "image_url", "image_url": {"url": image}},
                        ],
                    }
                ],
                max_tokens=8,
                extra_body={"ignore_eos": True},
            )
            self._count(chat.usage.completion_tokens)
            # Long and repeated: later requests find its blocks in the prefix cache.
            completion = client.completions.create(
                model=self.service.model,
                prompt=STORY,
                max_tokens=8,
                extra_body={"ignore_eos": True},
            )
            self._count(completion.usage.completion_tokens)

    def _run(self, work) -> None:
        from openai import OpenAI

        client = OpenAI(base_url=self.service.openai_url, api_key="unused", timeout=120, max_retries=0)
        try:
            work(client)
        except Exception as e:  # reported by the test, not lost in a thread
            self.errors.append(repr(e))

    def run_for(self, seconds: float, *, on_the_way=None) -> None:
        workers = [
            threading.Thread(target=self._run, args=(work,))
            for work in (self._text_streams, self._text_streams, self._whole_answers)
        ]
        for worker in workers:
            worker.start()
        time.sleep(seconds)
        if on_the_way:
            on_the_way()
        self._stop.set()
        for worker in workers:
            worker.join(timeout=120)
        assert not self.errors, self.errors


def substituted(expr: str, service) -> str:
    return (
        expr.replace("$__rate_interval", RATE_INTERVAL)
        .replace("$application", APP_NAME)
        .replace("$model", service.model)
        # The variable's All: this Prometheus, like any outside Kubernetes, has no namespace label.
        .replace("$namespace", ".*")
    )


@pytest.fixture(scope="module")
def observed(service, client, prometheus):
    """Traffic through the service while Prometheus scrapes it; what both sides counted."""
    # A first request of each kind makes every series exist before the measured window.
    Traffic(service).run_for(0.1)
    client.chat.completions.create(
        model=service.model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    bad = httpx.post(f"{service.openai_url}/chat/completions", json={"model": service.model}, timeout=30)
    assert bad.status_code == 400
    tokens = f'sum(ray_ministral_generation_tokens_total{{application="{APP_NAME}"}})'
    engine_tokens = f'sum(ray_vllm_generation_tokens_total{{model_name="{service.model}"}})'
    for expr in (tokens, engine_tokens):
        seen = wait_for(lambda expr=expr: prometheus.query(expr, time.time()), timeout_s=60)
        assert seen, f"Prometheus never saw {expr}"
    time.sleep(3 * SCRAPE_INTERVAL_S + 2)  # the warm-up's last tokens reach Prometheus
    started = time.time()
    traffic = Traffic(service)
    traffic.run_for(TRAFFIC_S)

    def counted_since_started(expr: str) -> float:
        return prometheus.value(expr, time.time()) - prometheus.value(expr, started)

    # The last tokens reach Prometheus a scrape or two after the traffic: wait until both counters
    # have counted as many as the client received (or a minute, and the tests say what they saw).
    wait_for(
        lambda: all(counted_since_started(e) >= traffic.tokens_received for e in (tokens, engine_tokens)),
        timeout_s=60,
    )
    ended = time.time()
    return {
        "traffic": traffic,
        "started": started,
        "ended": ended,
        "tokens": tokens,
        "engine_tokens": engine_tokens,
    }


@pytest.mark.parametrize("spec", DASHBOARDS, ids=lambda spec: spec.uid)
def test_every_panel_of_the_dashboard_shows_data(service, prometheus, observed, spec):
    # As Grafana draws a panel: the query over a time range, here the traffic's.
    # (On two saturated cores Ray's agent can miss a gauge's 2-s lifetime now
    # and then, so one instant may lack a gauge that the range still shows.)
    board = json.loads(spec.file.read_text())
    empty = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = substituted(target["expr"], service)
            if not prometheus.query_range(expr, observed["started"], observed["ended"]):
                empty.append(f"{panel['title']!r}: {expr}")
    assert not empty, "panels with no series while traffic flowed:\n" + "\n".join(empty)


def test_the_token_counters_match_what_the_client_received(service, prometheus, observed):
    received = observed["traffic"].tokens_received
    assert received > 0
    started, ended = observed["started"], observed["ended"]
    counted = prometheus.value(observed["tokens"], ended) - prometheus.value(observed["tokens"], started)
    assert counted == received
    # The engine counts the same tokens on its own (n = 1 everywhere here).
    engine = prometheus.value(observed["engine_tokens"], ended) - prometheus.value(
        observed["engine_tokens"], started
    )
    assert engine == received
    # The rate a dashboard draws, over the whole window, comes to the same
    # number, give or take the extrapolation at the window's edges.
    window = round(ended - started) + 2
    increase = prometheus.value(
        f'sum(increase(ray_ministral_generation_tokens_total{{application="{APP_NAME}"}}[{window}s]))', ended
    )
    assert increase == pytest.approx(received, rel=0.15)


def test_the_error_counter_names_the_status_and_the_openai_code(service, prometheus, observed):
    series = prometheus.query(
        f'ray_ministral_requests_total{{application="{APP_NAME}", status="400"}}', observed["ended"]
    )
    assert {(s["metric"]["route"], s["metric"]["error_code"]) for s in series} >= {
        ("/v1/chat/completions", "invalid_request_error")
    }


def test_the_exported_names_are_the_catalogues(service, observed):
    exported = {name for name, _, _ in scrape(service.metrics_url)}
    missing = [
        metric.name
        for metric in CATALOGUE
        if (metric.buckets if metric.kind == "histogram" else metric.series) not in exported
        and not metric.absent_until_first_event
    ]
    assert not missing, f"catalogued but not exported: {missing}"
    ours = {
        re.sub(r"(_total|_bucket|_sum|_count)$", "", name)
        for name in exported
        if name.startswith("ray_ministral_")
    }
    uncatalogued = ours - {metric.name for metric in CATALOGUE}
    assert not uncatalogued, f"exported but not in serve/metrics.py's catalogue: {uncatalogued}"
    # Seconds after the traffic, the idle engine's gauges are still there, and say it is idle.
    samples = scrape(service.metrics_url)
    assert total(samples, "ray_vllm_num_requests_running", model_name=service.model) == 0
    assert total(samples, "ray_vllm_num_requests_waiting", model_name=service.model) == 0
    assert any(name == "ray_vllm_kv_cache_usage_perc" for name, _, _ in samples)


def service_tokens_out(screen: str) -> float | None:
    """The "tok/s out" figure of top's service table, as drawn on the screen."""
    lines = screen.splitlines()
    headers = [line for line in lines if "tok/s out" in line and "req/s" in line]
    if not headers:
        return None
    # rich draws the header's borders heavy (┃) and the body's light (│), a rule between.
    columns = [cell.strip() for cell in re.split("[│┃]", headers[0])]
    values = [cell.strip() for cell in re.split("[│┃]", lines[lines.index(headers[0]) + 2])]
    return float(values[columns.index("tok/s out")])


def test_top_shows_tokens_per_second_while_traffic_flows(service, tmp_path):
    if TMUX is None:
        pytest.skip("tmux is not installed; scripts/install.sh installs it")
    session = f"ministral-top-{free_port()}"
    command = [
        str(Path(sys.executable).with_name("ministral-serve")),
        "top",
        "--metrics-url",
        service.metrics_url,
        "--interval",
        "1",
    ]
    subprocess.run(
        [TMUX, "new-session", "-d", "-s", session, "-x", "150", "-y", "45", " ".join(command)], check=True
    )

    def capture() -> str:
        return subprocess.run(
            [TMUX, "capture-pane", "-p", "-t", session], capture_output=True, text=True, check=True
        ).stdout

    def watch_until_tokens_show() -> None:
        # On two busy cores a refresh takes a second or two.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            screens.append(capture())
            if (service_tokens_out(screens[-1]) or 0) > 0:
                return
            time.sleep(1)

    screens: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while "req/s" not in capture():
            assert time.monotonic() < deadline, f"top drew nothing in 60 s:\n{capture()}"
            time.sleep(0.5)
        Traffic(service).run_for(2.0, on_the_way=watch_until_tokens_show)
    finally:
        subprocess.run([TMUX, "kill-session", "-t", session], check=False)
    screen = screens[-1]
    assert (service_tokens_out(screen) or 0) > 0, "\n---\n".join(screens)
    assert "Decoder" in screen and "Decoder replicas" in screen, screen
