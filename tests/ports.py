"""Local ports for servers started by tests (127.0.0.1 only)."""

from __future__ import annotations

import random
import socket

# Where test servers listen: below the ports the OS hands out for outgoing connections (32768
# and up), above Ray's worker ports (10002-19999) and its defaults, and below Serve's replica
# ports (30000 and up). A port the OS picked as free was sometimes taken, by one of the hundreds
# of connections Ray opens while it starts, before HAProxy came to bind it; and the OS once
# handed out 52365, which a Ray started later wanted for its dashboard agent.
TEST_PORTS = range(20000, 30000)


def free_port() -> int:
    """A port on 127.0.0.1 in TEST_PORTS that nothing listens on right now."""
    while True:
        port = random.choice(TEST_PORTS)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
