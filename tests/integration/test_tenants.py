"""Tenants behind the front door: two ingress replicas sharing one quota ledger, a tenants file
re-read while it runs, priority from the tenant to the engine's queue, and admission that knows
the client's deadline.

The application (`/tenants`) is the real one, without image stages (none of this needs them),
with the stand-in decoder (deployments/batching_stand_in.py: continuous batching timed by a
cost model, vLLM's priority order in its waiting queue, no model) of 2 batch slots, so that
requests wait in it: a second vLLM engine would cost the suite a minute. That vLLM itself puts
a request before queued ones of a lower priority is shown on the suite's shared application.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from serve.config import AppConfig
from tests.integration.conftest import run_behind_the_front_door
from tests.integration.replicas import replica_names
from tests.integration.scrape import reached
from tests.polling import wait_for

pytestmark = pytest.mark.slow

APP = "tenants"
PREFIX = "/tenants"
KEYS = {
    "limited": "sk-limited-6b1f",
    "high": "sk-high-93c2",
    "low": "sk-low-0d4e",
    "temporary": "sk-temporary-77aa",
    "added": "sk-added-5e10",
}


def digest(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def tenants_yaml(*names: str) -> str:
    settings = {
        "limited": "requests_per_minute: 30",
        "high": "priority: high",
        "low": "priority: low",
        "temporary": "weight: 1",
        "added": "weight: 1",
    }
    return "tenants:\n" + "".join(
        f"  - name: {name}\n    keys: ['{digest(KEYS[name])}']\n    {settings[name]}\n" for name in names
    )


@pytest.fixture(scope="module")
def tenants_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tenants") / "tenants.yaml"
    path.write_text(tenants_yaml("limited", "high", "low", "temporary"))
    return path


@pytest.fixture(scope="module")
def tenants_url(ray_cluster, demo_checkpoint, tenants_file):
    from ray import serve

    from deployments.batching_stand_in import StandInBatchingDecoder
    from serve.app import build_stages

    config = AppConfig.model_validate(
        {
            "model": {"source": str(demo_checkpoint), "served_name": "demo"},
            "engine": {"max_num_seqs": 2},
            "images": {"max_images_per_request": 0},
            "auth": {"tenants_file": str(tenants_file), "tenants_reload_s": 1},
            # All 16 low-priority requests reach the engine, whichever replica takes them.
            "admission": {"max_in_flight": 16, "reserved_for_high": 0},
            "use_default_system_prompt": False,
            "deployments": {
                "ingress": {"num_replicas": 2, "num_cpus": 0},
                "decoder": {"num_cpus": 0},
            },
        }
    )
    yield run_behind_the_front_door(
        build_stages(config, StandInBatchingDecoder), APP, PREFIX, ray_cluster.base_url
    )
    serve.delete(APP)


def chat(content: str, max_tokens: int, **extra) -> dict:
    return {
        "model": "demo",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        **extra,
    }


def post(url: str, tenant: str, body: dict, **headers) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEYS[tenant]}", **headers}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)


def test_a_tenant_at_30_a_minute_gets_30_of_60_across_both_ingress_replicas(tenants_url, ray_cluster):
    assert len(replica_names(APP, "Ingress")) == 2
    answers: list[httpx.Response] = []
    with ThreadPoolExecutor(8) as pool:
        futures = []
        for i in range(60):
            futures.append(pool.submit(post, tenants_url, "limited", chat(f"Label item {i}.", 1)))
            time.sleep(0.5)
        answers = [future.result() for future in futures]
    accepted = [answer for answer in answers if answer.status_code == 200]
    refused = [answer for answer in answers if answer.status_code == 429]
    assert 27 <= len(accepted) <= 33 and len(accepted) + len(refused) == 60
    assert accepted[0].headers["x-ratelimit-limit-requests"] == "30"
    for answer in refused:
        assert answer.json()["error"] == {
            "message": answer.json()["error"]["message"],
            "type": "requests",
            "param": None,
            "code": "rate_limit_exceeded",
        }
        assert answer.headers["x-ratelimit-limit-requests"] == "30"
        assert answer.headers["x-ratelimit-remaining-requests"] == "0"
        assert re.fullmatch(r"(\d+m)?\d+s|\d+ms", answer.headers["x-ratelimit-reset-requests"])
        # When the window's oldest admission leaves it: the first came ~30 s before the last.
        assert 1 <= int(answer.headers["retry-after"]) <= 60
    retry_after = int(refused[-1].headers["retry-after"])
    assert retry_after < 45, "the Retry-After is not computed from the window"
    time.sleep(retry_after)
    assert post(tenants_url, "limited", chat("Honoured.", 1)).status_code == 200

    # Both replicas answered the tenant: the limit held for the application, not per replica.
    def per_replica(samples):
        return {
            labels["replica"]
            for name, labels, value in samples
            if name == "ray_ministral_tenant_requests_total"
            and labels.get("tenant") == "limited"
            and value > 0
        }

    samples = reached(ray_cluster.metrics_url, lambda samples: len(per_replica(samples)) == 2)
    assert len(per_replica(samples)) == 2
    usage = httpx.get(
        f"{tenants_url}/v1/usage", headers={"Authorization": f"Bearer {KEYS['limited']}"}, timeout=10
    ).json()
    assert usage["tenant"] == "limited"
    assert usage["requests"]["200"] == len(accepted) + 1 and usage["requests"]["429"] == len(refused)
    assert usage["refusals"] == {"requests_per_minute": len(refused)}
    assert usage["completion_tokens"] == len(accepted) + 1
    # No key, nor its digest, in any metric.
    exported = httpx.get(ray_cluster.metrics_url, timeout=10).text
    assert not any(key in exported or digest(key)[7:] in exported for key in KEYS.values())


def test_a_key_removed_from_the_file_is_refused_and_one_added_works_within_10_s(tenants_url, tenants_file):
    assert post(tenants_url, "temporary", chat("Hello.", 1)).status_code == 200
    assert post(tenants_url, "added", chat("Hello.", 1)).status_code == 401
    tenants_file.write_text(tenants_yaml("limited", "high", "low", "added"))
    changed_at = time.monotonic()

    def both_replicas_know() -> bool:
        # Several tries, so that both replicas behind the front door are asked.
        return all(
            post(tenants_url, "temporary", chat("Hello.", 1)).status_code == 401
            and post(tenants_url, "added", chat("Hello.", 1)).status_code == 200
            for _ in range(4)
        )

    assert wait_for(both_replicas_know, timeout_s=15, interval_s=0.5)
    assert time.monotonic() - changed_at <= 10


class FirstTokens:
    """Streams chat requests from threads and records when each one's first token arrived."""

    def __init__(self, url: str):
        self.url = url
        self.at: dict[str, float] = {}
        self.statuses: list[int] = []
        self._threads: list[threading.Thread] = []

    def send(self, name: str, max_tokens: int, key: str, **extra) -> None:
        thread = threading.Thread(target=self._stream, args=(name, max_tokens, key, extra))
        thread.start()
        self._threads.append(thread)

    def _stream(self, name: str, max_tokens: int, key: str, extra: dict) -> None:
        body = chat(f"Request {name}.", max_tokens, stream=True, **extra)
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.stream(
            "POST", f"{self.url}/v1/chat/completions", json=body, headers=headers, timeout=120
        ) as r:
            self.statuses.append(r.status_code)
            for line in r.iter_lines():
                if not line.startswith("data: {") or name in self.at:
                    continue
                if any(choice["delta"].get("content") for choice in json.loads(line[6:])["choices"]):
                    self.at[name] = time.monotonic()

    def join(self) -> None:
        for thread in self._threads:
            thread.join(timeout=120)

    def started_after(self, name: str, others: list[str]) -> int:
        return sum(self.at[other] > self.at[name] for other in others)


def test_a_high_priority_request_overtakes_16_queued_low_priority_ones(tenants_url):
    from ray import serve

    decoder = serve.get_deployment_handle("Decoder", APP)
    streams = FirstTokens(tenants_url)
    lows = [f"low{i}" for i in range(16)]
    for name in lows:
        streams.send(name, 40, KEYS["low"])
    assert wait_for(
        lambda: decoder.num_unfinished_requests.remote().result() == 16, timeout_s=30, interval_s=0.05
    )
    streams.send("high", 10, KEYS["high"])
    streams.join()
    assert streams.statuses == [200] * 17 and len(streams.at) == 17
    overtaken = streams.started_after("high", lows)
    assert overtaken >= 12, f"the high-priority request started before only {overtaken} of 16"


def test_vllm_starts_a_request_before_queued_ones_of_a_lower_priority(service, decoder_handle):
    """The shared application's vLLM engine (32 batch slots, no tenants file: every key is the
    anonymous tenant, at normal priority, which a request may lower): 32 low-priority requests
    run, to finish one a step, 16 more wait behind them, then a normal one arrives."""

    def unfinished() -> int:
        return decoder_handle.num_unfinished_requests.remote().result()

    streams = FirstTokens(service.base_url)
    running = [f"running{i}" for i in range(32)]
    waiting = [f"waiting{i}" for i in range(16)]
    for i, name in enumerate(running):
        streams.send(name, 60 + i, "unused", priority="low")
    assert wait_for(lambda: unfinished() == 32, timeout_s=30, interval_s=0.05)
    for name in waiting:
        streams.send(name, 10, "unused", priority="low")
    assert wait_for(lambda: unfinished() == 48, timeout_s=30, interval_s=0.05)
    streams.send("normal", 10, "unused")
    streams.join()
    assert streams.statuses == [200] * 49 and len(streams.at) == 49
    assert max(streams.at[name] for name in running) < min(streams.at[name] for name in waiting)
    # First come, first served, it would start after all 16.
    overtaken = streams.started_after("normal", waiting)
    assert overtaken >= 12, f"vLLM started the normal-priority request before only {overtaken} of 16 waiting"
