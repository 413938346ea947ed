"""The README's `serve deploy` walkthrough, run as an operator runs it, with API keys on.

`ray start --head` on loopback (its own ports, home and temp folder), then
`serve deploy` of the demo config, `serve status` until RUNNING, requests with
the official client, `serve shutdown`, and the head stopped by its process
group. It runs before the suite's shared Ray instance starts (own_cluster).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from benchmarks.stacks import marked_processes
from tests.integration.user_head import RAY, UserHead, user_environment
from tests.polling import wait_for
from tests.ports import free_port

pytestmark = pytest.mark.own_cluster

ROOT = Path(__file__).parents[2]
SERVE = Path(sys.executable).with_name("serve")
API_KEY = "sk-walkthrough-key"


def run(
    command: list[str], environment: dict[str, str], timeout_s: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout_s
    )


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    # A short name: Ray's socket paths under it must stay within 107 bytes.
    home = tmp_path_factory.mktemp("op")
    # As docs/kubernetes.md says: Ray's token authentication on, with a token made once.
    environment = {**user_environment(home), "RAY_AUTH_MODE": "token", "MINISTRAL_API_KEYS": API_KEY}
    token = run([str(RAY), "get-auth-token", "--generate"], environment, timeout_s=120)
    assert token.returncode == 0 and (home / ".ray" / "auth_token").is_file(), token.stderr
    dashboard_port, http_port = free_port(), free_port()
    head = UserHead(environment, "--num-cpus=2", "--num-gpus=0", f"--dashboard-port={dashboard_port}")
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        assert wait_for(head.record.exists, timeout_s=120), head.output()
        # The shipped config, on a port of the test's own.
        config = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
        config["http_options"]["port"] = http_port
        config_path = home / "config.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))

        deployed = run([str(SERVE), "deploy", str(config_path), "--address", address], environment)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr

        def running() -> bool:
            status = run([str(SERVE), "status", "--address", address], environment, timeout_s=60)
            return "status: RUNNING" in status.stdout

        assert wait_for(running, timeout_s=420), run(
            [str(SERVE), "status", "--address", address], environment
        ).stdout
        yield f"http://127.0.0.1:{http_port}", address, environment
        shutdown = run([str(SERVE), "shutdown", "--address", address, "--yes"], environment)
        assert shutdown.returncode == 0, shutdown.stderr
    finally:
        head.stop()
    # Nothing of this head is left, and nothing else was touched (no `ray stop`).
    assert wait_for(lambda: not marked_processes(f"RAY_TMPDIR={home}"), timeout_s=30)


def test_a_deployed_demo_answers_a_chat_request_with_its_key(walkthrough):
    base_url, _, _ = walkthrough
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    (model,) = client.models.list().data
    assert model.id == "ministral-3-demo"
    response = client.chat.completions.create(
        model=model.id, messages=[{"role": "user", "content": "Hello!"}], max_tokens=4
    )
    assert response.usage.completion_tokens >= 1
    assert response.choices[0].finish_reason in {"stop", "length"}


def test_without_the_key_only_health_answers(walkthrough):
    base_url, _, _ = walkthrough
    assert httpx.get(f"{base_url}/health", timeout=30).status_code == 200
    for headers, params in (
        ({}, {}),
        ({"Authorization": "Bearer sk-wrong"}, {}),
        ({}, {"api_key": API_KEY}),
    ):
        refused = httpx.get(f"{base_url}/v1/models", headers=headers, params=params, timeout=30)
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_api_key"
        assert API_KEY not in refused.text and "sk-wrong" not in refused.text
    wrong = openai.OpenAI(base_url=f"{base_url}/v1", api_key="sk-wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_rays_cli_without_the_token_is_refused(walkthrough):
    _, address, environment = walkthrough
    anonymous = {**environment, "RAY_AUTH_MODE": "disabled"}
    refused = run([str(SERVE), "status", "--address", address], anonymous, timeout_s=120)
    assert refused.returncode != 0
    assert "AuthenticationError" in refused.stderr


def test_the_key_appears_in_no_log(walkthrough):
    _, _, environment = walkthrough
    logs = Path(environment["RAY_TMPDIR"]) / "ray" / "session_latest" / "logs"
    assert logs.is_dir()
    leaked = [
        path.name for path in logs.rglob("*") if path.is_file() and API_KEY.encode() in path.read_bytes()
    ]
    assert leaked == []
