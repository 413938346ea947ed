"""The suite runs on a Ray instance of its own, beside a cluster the user started or the record of one.

The README's `serve deploy` path starts a Ray head (`ray start --head`),
which writes where it listens into Ray's temp folder; a plain `ray.init()`
then joins it, refusing `num_cpus`/`num_gpus`, and fails on the record once
that cluster has stopped. Here a head runs as a user's would, in a home and
temp folder of the test's own (so the real ones are not touched), and an
integration module runs beside it, in a pytest of its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.polling import wait_for
from tests.ports import free_port

pytestmark = pytest.mark.own_cluster

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def user_environment(tmp_path_factory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("user-home")
    environment = {**os.environ, "HOME": str(home), "TMPDIR": str(home), "RAY_TMPDIR": str(home)}
    environment.pop("RAY_ADDRESS", None)
    return environment


class UserHead:
    """`ray start --head` on loopback, as a user starts it."""

    def __init__(self, environment: dict[str, str]):
        self.record = Path(environment["RAY_TMPDIR"]) / "ray" / "ray_current_cluster"
        self._process = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("ray")),
                "start",
                "--head",
                "--block",
                "--node-ip-address=127.0.0.1",
                f"--port={free_port()}",
                "--num-cpus=1",
                "--include-dashboard=false",
                "--disable-usage-stats",
            ],
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def stop(self) -> None:
        """Killed, not `ray stop`ped: the record of the cluster stays behind, as after a crash."""
        if self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait(timeout=30)


@pytest.fixture(scope="module")
def user_head(user_environment):
    head = UserHead(user_environment)
    try:
        assert wait_for(head.record.exists, timeout_s=120), "ray start --head wrote no cluster record"
        yield head
    finally:
        head.stop()


def python(code: str, environment: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300
    )


SERVE_APPLICATIONS = """
import ray
ray.init(address="auto")
print(sorted(actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)))
"""
PLAIN_INIT = "import ray; ray.init(num_cpus=1, num_gpus=1)"
OWN_RAY = """
from tests.ray_instance import start_own_ray
import ray
start_own_ray(num_cpus=1, num_gpus=1)
print(ray.cluster_resources()["GPU"])
"""


def test_an_integration_module_passes_beside_a_running_cluster(user_head, user_environment):
    # The hazard is real: a plain ray.init() joins the user's cluster and refuses the suite's resources.
    joined = python(PLAIN_INIT, user_environment)
    assert joined.returncode != 0
    assert "num_cpus and num_gpus must not be provided" in joined.stderr

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/integration/test_placement.py",
            "-k",
            "1gpu",
            "-q",
            "-p",
            "no:cacheprovider",
        ],
        cwd=ROOT,
        env=user_environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1 passed" in result.stdout

    # Nothing of the suite's landed on the user's cluster.
    actors = python(SERVE_APPLICATIONS, user_environment)
    assert actors.returncode == 0, actors.stderr[-3000:]
    assert "SERVE_CONTROLLER_ACTOR" not in actors.stdout


def test_the_suites_ray_starts_beside_the_record_of_a_stopped_cluster(user_head, user_environment):
    user_head.stop()
    assert user_head.record.exists()
    # The hazard is real: a plain ray.init() tries the recorded cluster and fails.
    assert python(PLAIN_INIT, user_environment).returncode != 0
    own = python(OWN_RAY, user_environment)
    assert own.returncode == 0, own.stderr[-3000:]
    assert own.stdout.strip().splitlines()[-1] == "1.0"
