"""Loaded by every Python process of the checkov run in tests/unit/test_helm_checkov.py (PYTHONPATH):
any attempt to reach the network (a name lookup, an IP connection, a c-ares query) is refused and
written to the file named by NETWORK_ATTEMPTS_FILE, which the test reads."""

import os
import socket

_FILE = os.environ.get("NETWORK_ATTEMPTS_FILE")


def _refuse(what: str) -> None:
    with open(_FILE, "a") as attempts:
        attempts.write(f"{os.getpid()} {what}\n")
    raise OSError(f"network refused in the checkov test: {what}")


if _FILE:
    _connect = socket.socket.connect
    _connect_ex = socket.socket.connect_ex

    def connect(self, address):
        if self.family == socket.AF_UNIX:
            return _connect(self, address)
        _refuse(f"connect {address!r}")

    def connect_ex(self, address):
        if self.family == socket.AF_UNIX:
            return _connect_ex(self, address)
        _refuse(f"connect {address!r}")

    def getaddrinfo(host, *args, **kwargs):
        _refuse(f"getaddrinfo {host!r}")

    def gethostbyname(host):
        _refuse(f"gethostbyname {host!r}")

    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.getaddrinfo = getaddrinfo
    socket.gethostbyname = gethostbyname
    try:
        import pycares  # aiodns's resolver, which skips Python's sockets

        for _name in ("query", "search", "getaddrinfo", "gethostbyname", "gethostbyaddr"):

            def _refused(self, *args, _name=_name, **kwargs):
                _refuse(f"c-ares {_name} {args[:1]!r}")

            setattr(pycares.Channel, _name, _refused)
    except ImportError:
        pass
