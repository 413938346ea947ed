"""Local ports for servers started by tests (127.0.0.1 only)."""

from __future__ import annotations

import socket

# Ports that Ray, Serve and HAProxy take by default when not told otherwise. The OS hands out
# ports from 32768 to 60999, so a test could get one of these and a Ray started after it would
# refuse to start: `ray start --head --port=52365` once clashed with its own dashboard agent.
DEFAULT_SERVICE_PORTS = frozenset({6379, 8000, 8076, 8080, 8265, 8404, 9101, 10001, 44217, 44227, 52365})


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now (the OS picks it), and that no Ray
    component takes by default."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in DEFAULT_SERVICE_PORTS:
            return port
