"""`ministral-serve run` as `make serve` starts it (HAProxy front door, loopback), seen from outside:
where its processes listen, and what the front door does with a client that never finishes its
header, with an invented HTTP method, and with its admin socket (docs/reliability.md, "Listeners
and the front door"), and what it answers past the ingress's own queue.

One service, on free ports for everything that listens at a fixed one (the API, Ray's metrics,
HAProxy's stats page and exporter), started once for the module and stopped by its process group
and its processes' mark.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import psutil
import pytest

from benchmarks.stacks import OurService, marked_processes
from serve.config import AppConfig
from serve.front_door import LIMITS
from tests.integration.scrape import by_label, scrape
from tests.polling import wait_for
from tests.ports import free_port

pytestmark = [pytest.mark.slow, pytest.mark.own_cluster]

SERVE_HTTP_REQUESTS = "ray_serve_num_http_requests_total"
INGRESS_SLOTS = 2
INGRESS_QUEUE = 1


class FrontDoorService(OurService):
    """Our service with every fixed port of its own, and Ray's metrics exported every second."""

    def __init__(self, config: AppConfig, log_path: Path):
        super().__init__(config, free_port(), log_path)
        self.ports = {
            "METRICS_PORT": free_port(),
            "RAY_SERVE_HAPROXY_STATS_PORT": free_port(),
            "RAY_SERVE_HAPROXY_METRICS_PORT": free_port(),
        }
        self.metrics_url = f"http://127.0.0.1:{self.ports['METRICS_PORT']}/metrics"

    def environment(self) -> dict[str, str]:
        return {
            **super().environment(),
            **{variable: str(port) for variable, port in self.ports.items()},
            "RAY_metrics_report_interval_ms": "1000",
        }


@dataclass(frozen=True)
class Listener:
    address: str
    port: int
    process: str

    @property
    def on_loopback(self) -> bool:
        address = ipaddress.ip_address(self.address)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return address.is_loopback


def listeners(mark: str) -> list[Listener]:
    """Every listening TCP socket of the processes that carry `mark`, and their descendants."""
    found = []
    for pid in marked_processes(mark):
        try:
            process = psutil.Process(pid)
            name = process.name()
            connections = process.net_connections(kind="inet")
        except psutil.Error:
            continue
        found.extend(
            Listener(connection.laddr.ip, connection.laddr.port, name)
            for connection in connections
            if connection.status == psutil.CONN_LISTEN
        )
    return found


@pytest.fixture(scope="module")
def service(demo_checkpoint, tmp_path_factory):
    # Text only, so that no image stage has to start.
    config = AppConfig.model_validate(
        {
            "model": {"source": str(demo_checkpoint), "served_name": "demo"},
            "engine": {"max_model_len": 1024, "cpu_kv_cache_space_gib": 1, "max_num_seqs": 8},
            "images": {"max_images_per_request": 0},
            "deployments": {
                "ingress": {
                    "num_cpus": 0,
                    "max_ongoing_requests": INGRESS_SLOTS,
                    "max_queued_requests": INGRESS_QUEUE,
                },
                "decoder": {"num_cpus": 1},
            },
        }
    )
    with FrontDoorService(config, tmp_path_factory.mktemp("front-door") / "ours.log") as running:
        yield running
    assert wait_for(lambda: not marked_processes(running.process_mark), timeout_s=30)


def rays_replica_grpc_server(listener: Listener) -> bool:
    """The allow-list: Ray Serve starts each replica's inter-deployment gRPC server on every
    interface (`[::]:0` in ray/serve/_private/replica.py, with no setting), behind Ray's token
    authentication; everything else of Ray's follows the node's address."""
    return listener.process.startswith("ray::ServeReplica:") and listener.address in ("::", "0.0.0.0")


def test_every_listener_of_the_service_is_on_loopback_but_rays_replica_grpc_servers(service):
    found = listeners(service.process_mark)
    allowed = [listener for listener in found if rays_replica_grpc_server(listener)]
    assert [listener for listener in found if not (listener.on_loopback or listener in allowed)] == []
    # One per replica (ingress and decoder), none of them an HTTP page, each refusing a call
    # without Ray's token.
    assert sorted(listener.process for listener in allowed) == [
        "ray::ServeReplica:ministral:Decoder",
        "ray::ServeReplica:ministral:Ingress",
    ]
    for listener in allowed:
        assert not http_answer(listener.port).startswith(b"HTTP/")
        assert grpc_status_without_token(listener.port) == grpc.StatusCode.UNAUTHENTICATED

    ports = {listener.port: listener for listener in found}
    # The API, HAProxy's stats page and exporter, and Ray's metrics, all seen, all on 127.0.0.1.
    for port in (service.port, *service.ports.values()):
        assert port in ports, f"nothing listens on {port}: {found}"
        assert ports[port].address == "127.0.0.1"
    assert ports[service.port].process == "haproxy"


def http_answer(port: int) -> bytes:
    """What a server on 127.0.0.1:`port` answers a plain HTTP/1.1 GET with, in its first second."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        client.settimeout(1)
        try:
            return client.recv(64)
        except (TimeoutError, ConnectionError):
            return b""


def grpc_status_without_token(port: int) -> grpc.StatusCode:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/ray.serve.ASGIService/HandleRequest")
        try:
            call(b"", timeout=10)
        except grpc.RpcError as refused:
            return refused.code()
    return grpc.StatusCode.OK


def test_a_client_that_never_finishes_its_header_is_cut_off(service):
    limit_s = LIMITS.request_head_timeout_s
    with socket.create_connection(("127.0.0.1", service.port), timeout=limit_s + 5) as client:
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appl")
        started = time.monotonic()
        answer = b""
        while chunk := client.recv(4096):
            answer += chunk
        waited_s = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert limit_s - 1 <= waited_s <= limit_s + 3


def test_an_invented_method_is_refused_before_it_becomes_a_metrics_label(service):
    before = by_label(scrape(service.metrics_url), SERVE_HTTP_REQUESTS, "method")
    refused = httpx.request("FOOBAR", f"{service.base_url}/v1/models", timeout=30)
    assert refused.status_code == 405
    assert refused.headers["allow"] == "GET, POST"
    assert refused.json()["error"] == {
        "message": "method not allowed: this API serves GET and POST",
        "type": "invalid_request_error",
        "param": None,
        "code": 405,
    }
    # A request after it, which Serve's metrics do count: once it shows, so would the FOOBAR.
    assert httpx.get(f"{service.base_url}/health", timeout=30).status_code == 200

    def counted() -> bool:
        methods = by_label(scrape(service.metrics_url), SERVE_HTTP_REQUESTS, "method")
        return methods.get("GET", 0) > before.get("GET", 0)

    assert wait_for(counted, timeout_s=60)
    assert "FOOBAR" not in httpx.get(service.metrics_url, timeout=10).text


def test_the_running_haproxy_holds_clients_to_the_front_doors_limits(service):
    """What HAProxy runs with, read from its live config (Ray renders it from the environment
    `ministral-serve run` sets, at import time)."""
    for config in running_configs(service):
        text = config.read_text()
        # Every section that sets them (defaults, frontends, backends) sets them to the limits.
        assert set(re.findall(r"^\s*timeout client (\S+)$", text, re.MULTILINE)) == {
            f"{LIMITS.client_idle_timeout_s}s"
        }, text
        assert set(re.findall(r"^\s*timeout http-request (\S+)$", text, re.MULTILINE)) == {
            f"{LIMITS.request_head_timeout_s}s"
        }, text


def running_configs(service) -> set[Path]:
    configs = {
        Path(arguments[arguments.index("-f") + 1])
        for arguments in (
            psutil.Process(pid).cmdline()
            for pid in marked_processes(service.process_mark)
            if psutil.Process(pid).name() == "haproxy"
        )
    }
    assert configs
    return configs


def test_haproxys_admin_socket_is_its_users_only(service):
    for config in running_configs(service):
        (admin_socket,) = re.findall(r"^\s*stats socket (\S+) ", config.read_text(), re.MULTILINE)
        mode = os.stat(admin_socket).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
        # ... in a folder of its user's only, with the other sockets and the config.
        folder = Path(admin_socket).parent.parent
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_past_the_ingress_queue_the_front_door_answers_429_at_once(service):
    # Eight at once: INGRESS_SLOTS run, INGRESS_QUEUE wait, the rest are refused before any has
    # finished.
    def ask(i: int) -> tuple[httpx.Response, float, float]:
        started = time.monotonic()
        with httpx.Client(timeout=120) as http:
            response = http.post(
                f"{service.base_url}/v1/chat/completions",
                json={
                    "model": "demo",
                    "messages": [{"role": "user", "content": f"Story {i}"}],
                    "max_tokens": 200,
                    "ignore_eos": True,
                },
            )
        return response, started, time.monotonic()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    statuses = sorted(response.status_code for response, _, _ in answers)
    assert set(statuses) == {200, 429}, statuses
    assert statuses.count(200) >= INGRESS_SLOTS + INGRESS_QUEUE, statuses
    first_finished = min(ended for response, _, ended in answers if response.status_code == 200)
    for response, _, ended in answers:
        if response.status_code == 429:
            # Refused by Serve in the ingress replica's own HTTP server, not by the application:
            # Serve's plain text (docs/reliability.md, "Overload").
            assert ended < first_finished
            assert int(response.headers["retry-after"]) >= 1
            assert response.text == "Request dropped due to backpressure"
