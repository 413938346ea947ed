"""How the benchmark starts and stops a server: real processes, a tiny HTTP server in place of a stack.

The server stays in the runner's session (Linux schedules a session as one
group, and a server in a group of its own starved the load generator), and
stop() still finds what the server left behind, even a process that moved to
a session of its own.
"""

from __future__ import annotations

import os
import signal
import sys

import pytest

from benchmarks.stacks import Server
from tests.polling import wait_for
from tests.ports import free_port

# Starts a detached child (as Ray and vLLM start theirs), writes its pid, then serves `directory`.
LAUNCHER = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
open(sys.argv[3], "w").write(str(child.pid))
import http.server, functools
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[2])
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), handler).serve_forever()
"""


class TinyServer(Server):
    name = key = "tiny"

    def __init__(self, port, tmp_path):
        super().__init__(port, tmp_path / "tiny.log")
        self.root = tmp_path / "root"
        (self.root / "v1").mkdir(parents=True)
        (self.root / "v1" / "models").write_text("{}")
        self.child_pid_file = tmp_path / "child.pid"

    def command(self):
        return [sys.executable, "-c", LAUNCHER, str(self.port), str(self.root), str(self.child_pid_file)]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_server_shares_the_runners_session_and_stop_leaves_nothing(tmp_path):
    server = TinyServer(free_port(), tmp_path)
    with server:
        child_pid = int(server.child_pid_file.read_text())
        assert os.getsid(server._process.pid) == os.getsid(0)
        assert os.getpgid(server._process.pid) == server._process.pid != os.getpgid(0)
        assert os.getsid(child_pid) != os.getsid(0)
        assert _alive(child_pid)
    assert wait_for(lambda: not _alive(child_pid), timeout_s=10)
    assert server._process.poll() is not None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_stop_spares_processes_of_another_server(tmp_path):
    first, second = TinyServer(free_port(), tmp_path / "a"), TinyServer(free_port(), tmp_path / "b")
    with second:
        second_child = int(second.child_pid_file.read_text())
        with first:
            pass
        assert _alive(second_child)
        assert second._process.poll() is None


def test_stop_shuts_a_server_down_cleanly_even_when_the_runner_ignores_sigint(tmp_path):
    # A runner started in the background (`make bench &`, nohup) has SIGINT ignored,
    # and its children would inherit that: stop() would wait out its grace and SIGKILL.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        server = TinyServer(free_port(), tmp_path)
        with server:
            pass
    finally:
        signal.signal(signal.SIGINT, previous)
    assert server._process.returncode == -signal.SIGINT
