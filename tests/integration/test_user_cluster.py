"""The suite runs on a Ray instance of its own, beside a cluster the user started or the record of one.

The README's `serve deploy` path starts a Ray head (`ray start --head`),
which writes where it listens into Ray's temp folder; a plain `ray.init()`
then joins it, refusing `num_cpus`/`num_gpus`, and fails on the record once
that cluster has stopped. Here a head runs as a user's would, in a home and
temp folder of the test's own (so the real ones are not touched), and an
integration module runs beside it, in a pytest of its own.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.user_head import UserHead, user_environment
from tests.polling import wait_for

pytestmark = pytest.mark.own_cluster

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def environment(tmp_path_factory) -> dict[str, str]:
    return user_environment(tmp_path_factory.mktemp("user-home"))


@pytest.fixture(scope="module")
def user_head(environment):
    head = UserHead(environment, "--num-cpus=1", "--include-dashboard=false")
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


def test_an_integration_module_passes_beside_a_running_cluster(user_head, environment):
    # The hazard is real: a plain ray.init() joins the user's cluster and refuses the suite's resources.
    joined = python(PLAIN_INIT, environment)
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
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1 passed" in result.stdout

    # Nothing of the suite's landed on the user's cluster.
    actors = python(SERVE_APPLICATIONS, environment)
    assert actors.returncode == 0, actors.stderr[-3000:]
    assert "SERVE_CONTROLLER_ACTOR" not in actors.stdout


def test_the_suites_ray_starts_beside_the_record_of_a_stopped_cluster(user_head, environment):
    user_head.stop()
    assert user_head.record.exists()
    # The hazard is real: a plain ray.init() tries the recorded cluster and fails.
    assert python(PLAIN_INIT, environment).returncode != 0
    own = python(OWN_RAY, environment)
    assert own.returncode == 0, own.stderr[-3000:]
    assert own.stdout.strip().splitlines()[-1] == "1.0"
