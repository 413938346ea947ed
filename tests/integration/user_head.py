"""`ray start --head` on loopback, as a user starts it, in a home and temp folder of the test's own."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from benchmarks.stacks import marked_processes
from tests.ports import free_port

RAY = Path(sys.executable).with_name("ray")


def user_environment(home: Path) -> dict[str, str]:
    """The user's shell, with HOME and Ray's temp folder moved under `home` (the real ones stay untouched)."""
    environment = {**os.environ, "HOME": str(home), "TMPDIR": str(home), "RAY_TMPDIR": str(home)}
    environment.pop("RAY_ADDRESS", None)
    return environment


class UserHead:
    """A Ray head started with `ray start --head --block`, stopped by its process group."""

    def __init__(self, environment: dict[str, str], *options: str):
        self._temp_dir = environment["RAY_TMPDIR"]
        self.record = Path(self._temp_dir) / "ray" / "ray_current_cluster"
        self.log = Path(environment["RAY_TMPDIR"]) / "ray-start.log"
        with self.log.open("wb") as log:
            self._process = subprocess.Popen(
                [
                    str(RAY),
                    "start",
                    "--head",
                    "--block",
                    "--node-ip-address=127.0.0.1",
                    f"--port={free_port()}",
                    "--disable-usage-stats",
                    *options,
                ],
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        """The end of what `ray start` printed: why a head did not come up."""
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        """Killed, not `ray stop`ped: the record of the cluster stays behind, as after a crash.

        Every process of this head goes, found by the temp folder in its
        environment; `ray stop` would also stop any other Ray on the machine."""
        if self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait(timeout=30)
        for pid in marked_processes(f"RAY_TMPDIR={self._temp_dir}"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
