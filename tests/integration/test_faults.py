"""Overload, time limits, lost replicas and shutdown: every request ends, none hangs.

These run on an application of their own (`/faults`): it has small queues
and a short time limit, and its replicas get killed, which the shared one
must not see. Its preprocess and encoder stages have two replicas each, as a
production service would: a retried request goes to the survivor at once,
instead of waiting, within the time limit, for Serve to start a replacement
on a loaded machine (in a full run that took more than 12 s); recovery by
replacement is the decoder's test. Every request here has a client-side
limit (`HANG_S`): one that reaches it counts as hung, and fails the test.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import psutil
import pytest

from serve.config import AppConfig
from tests.image_server import data_url, image_bytes
from tests.integration.conftest import run_behind_the_front_door
from tests.integration.replicas import replica_names
from tests.polling import wait_for

APP = "faults"
PREFIX = "/faults"
DECODER_SLOTS = 2
DECODER_QUEUE = 2
TIME_LIMIT_S = 12.0
RETRY_AFTER_S = 2
# A request still unanswered after this long is hung.
HANG_S = 60.0


@dataclass(frozen=True)
class Outcome:
    """How one request ended, as its client saw it."""

    kind: str  # "completed", "error" or "hung"
    status: int | None = None
    code: str | None = None
    tokens: int = 0
    seconds_to_status: float = 0.0
    retry_after: str | None = None


@pytest.fixture(scope="module")
def faults_url(ray_cluster, demo_checkpoint, image_server):
    from ray import serve

    from serve.app import build_app

    config = AppConfig.model_validate(
        {
            "model": {"source": str(demo_checkpoint), "served_name": "demo"},
            "engine": {"max_model_len": 4096, "cpu_kv_cache_space_gib": 1, "max_num_seqs": 4},
            "images": {"allow_private_networks": True, "allowed_ports": [], "fetch_timeout_s": 5.0},
            "limits": {"request_timeout_s": TIME_LIMIT_S, "retry_after_s": RETRY_AFTER_S},
            "use_default_system_prompt": False,
            "deployments": {
                "ingress": {"num_cpus": 0},
                "preprocess": {"num_replicas": 2, "num_cpus": 0, "health_check_period_s": 1},
                "encoder": {"num_replicas": 2, "num_cpus": 0, "health_check_period_s": 1},
                "decoder": {
                    "num_cpus": 0,
                    "max_ongoing_requests": DECODER_SLOTS,
                    "max_queued_requests": DECODER_QUEUE,
                    "health_check_period_s": 1,
                },
            },
        }
    )
    base_url = run_behind_the_front_door(build_app(config), APP, PREFIX, ray_cluster.base_url)
    # The ingress asks the decoder for its settings once: before the tests count the decoder's slots.
    assert send(base_url, chat("Warm up", 2, stream=False)).kind == "completed"
    yield base_url
    if APP in serve.status().applications:
        serve.delete(APP)


def chat(content, max_tokens: int, *, stream: bool) -> dict:
    payload = {
        "model": "demo",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }
    return payload | ({"stream_options": {"include_usage": True}} if stream else {})


def image_content(image_url: str) -> list[dict]:
    return [{"type": "text", "text": "Describe it."}, {"type": "image_url", "image_url": {"url": image_url}}]


def unique_image(i: int) -> str:
    return data_url(image_bytes(size=(64, 48), color=(i * 37 % 256, i * 91 % 256, 200)))


def send(base_url: str, payload: dict) -> Outcome:
    """One request, to its end: completed (tokens counted), an error (status or error event), or hung."""
    started = time.monotonic()
    try:
        with (
            httpx.Client(timeout=HANG_S) as http,
            http.stream("POST", f"{base_url}/v1/chat/completions", json=payload) as response,
        ):
            to_status = time.monotonic() - started
            retry_after = response.headers.get("retry-after")
            if response.status_code != 200:
                error = json.loads(response.read())["error"]
                assert error["message"], error
                return Outcome("error", response.status_code, error["code"], 0, to_status, retry_after)
            if not payload["stream"]:
                usage = json.loads(response.read())["usage"]
                return Outcome("completed", 200, None, usage["completion_tokens"], to_status)
            tokens, done = 0, False
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    event = json.loads(line[len("data: ") :])
                    if "error" in event:
                        return Outcome("error", 200, event["error"]["code"] or event["error"]["type"])
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
            return Outcome("completed" if done else "error", 200, None if done else "cut", tokens, to_status)
    except httpx.TimeoutException:
        return Outcome("hung")


def send_all(base_url: str, payloads: list[dict], *, stagger_s: float = 0.0) -> list[Outcome]:
    with ThreadPoolExecutor(len(payloads)) as pool:
        futures = []
        for payload in payloads:
            futures.append(pool.submit(send, base_url, payload))
            time.sleep(stagger_s)
        return [future.result() for future in futures]


def unfinished_in_engine() -> int:
    from ray import serve

    return (
        serve.get_deployment_handle("Decoder", app_name=APP)
        .num_unfinished_requests.remote()
        .result(timeout_s=30)
    )


def kill_replica(deployment: str, killed: list[str] | None = None) -> str:
    """Kill one replica of `deployment` (its first by name); its name is returned and added to `killed`."""
    import ray

    name = replica_names(APP, deployment)[0]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    if killed is not None:
        killed.append(name)
    return name


def health(base_url: str) -> httpx.Response:
    return httpx.get(f"{base_url}/health", timeout=30)


def recovered(base_url: str, deployment: str, killed: str) -> bool:
    """A replica other than the killed one runs, and the service says it is healthy."""
    return wait_for(
        lambda: replica_names(APP, deployment) not in ([], [killed]) and health(base_url).status_code == 200,
        timeout_s=180,
    )


def test_a_full_decoder_queue_answers_429_at_once_and_the_accepted_requests_complete(faults_url):
    assert wait_for(lambda: unfinished_in_engine() == 0)
    outcomes = send_all(faults_url, [chat(f"Story {i}", 48, stream=i % 2 == 0) for i in range(10)])
    kinds = Counter((o.kind, o.status) for o in outcomes)
    assert not [o for o in outcomes if o.kind == "hung" or (o.status or 0) >= 500], outcomes
    refused = [o for o in outcomes if o.status == 429]
    accepted = [o for o in outcomes if o.kind == "completed"]
    assert len(accepted) >= DECODER_SLOTS + DECODER_QUEUE, kinds
    assert len(refused) + len(accepted) == len(outcomes), kinds
    assert refused, (
        f"ten requests at once fit in {DECODER_SLOTS} slots and a queue of {DECODER_QUEUE}: {kinds}"
    )
    for outcome in refused:
        assert outcome.code == "overloaded"
        assert outcome.retry_after == str(RETRY_AFTER_S)
        assert outcome.seconds_to_status < 1.0, outcome
    assert all(o.tokens == 48 for o in accepted), accepted


def test_a_request_past_the_time_limit_is_stopped_in_the_engine(faults_url):
    # Far more tokens than fit in the time limit.
    started = time.monotonic()
    streamed, whole = send_all(
        faults_url, [chat("Go on.", 4000, stream=True), chat("Go on.", 4000, stream=False)]
    )
    elapsed = time.monotonic() - started
    assert streamed == Outcome("error", 200, "request_timeout"), streamed
    assert (whole.kind, whole.status, whole.code) == ("error", 504, "request_timeout"), whole
    assert TIME_LIMIT_S <= elapsed < TIME_LIMIT_S + 10
    assert wait_for(lambda: unfinished_in_engine() == 0, timeout_s=10), "the engine kept generating"


def fetching_process(image_server) -> int | None:
    """The process holding a connection open to the image server (a preprocess replica that
    fetches), if one does."""
    server_port = urlsplit(image_server.base_url).port
    for connection in psutil.net_connections(kind="tcp"):
        if connection.raddr and connection.raddr.port == server_port and connection.pid != os.getpid():
            return connection.pid
    return None


def test_a_lost_preprocess_replica_is_retried(faults_url, image_server):
    # Each fetch takes 1.5 s: the replica caught fetching is killed with the request inside it.
    urls = [image_server.url(f"slow/1.5?lost-preprocess={i}") for i in range(4)]
    payloads = [chat(image_content(url), 4, stream=i % 2 == 0) for i, url in enumerate(urls)]
    with ThreadPoolExecutor(1) as sender:
        sending = sender.submit(send_all, faults_url, payloads)
        assert wait_for(lambda: fetching_process(image_server) is not None, timeout_s=30)
        os.kill(fetching_process(image_server), signal.SIGKILL)
        outcomes = sending.result()
    assert [o.kind for o in outcomes] == ["completed"] * 4, outcomes
    assert all(o.tokens == 4 for o in outcomes)
    # A request of the killed replica was sent again, to the other one, which fetched its image again.
    fetches = Counter(path for path in image_server.requests if "lost-preprocess=" in path)
    assert set(fetches) == {urlsplit(url).path + "?" + urlsplit(url).query for url in urls}
    assert max(fetches.values()) >= 2, fetches


def test_a_lost_encoder_replica_is_retried(faults_url):
    # Requests keep arriving over the kill: some reach the dying replica, some find it gone.
    killed: list[str] = []
    killer = threading.Timer(1.0, kill_replica, args=("Encoder", killed))
    killer.start()
    outcomes = send_all(
        faults_url, [chat(image_content(unique_image(i)), 4, stream=False) for i in range(8)], stagger_s=0.25
    )
    killer.join()
    assert [o.kind for o in outcomes] == ["completed"] * 8, outcomes
    assert killed


def test_a_lost_decoder_ends_its_requests_with_errors_and_the_service_recovers(faults_url):
    payloads = [chat(f"Story {i}", 3000, stream=i % 2 == 0) for i in range(DECODER_SLOTS)]
    killed: list[str] = []
    killer = threading.Timer(2.0, kill_replica, args=("Decoder", killed))
    killer.start()
    outcomes = send_all(faults_url, payloads)
    killer.join()
    assert [(o.kind, o.status) for o in outcomes] == [("error", 200), ("error", 503)], outcomes
    # Serve notices the lost replica at its next health check (every second here).
    seen: list[httpx.Response] = []
    assert wait_for(lambda: seen.append(health(faults_url)) or seen[-1].status_code == 503, timeout_s=15)
    assert seen[-1].json()["stages"]["decoder"].startswith("no running replica")
    assert seen[-1].json()["stages"]["encoder"] == "ok"
    assert recovered(faults_url, "Decoder", killed[0]), "no healthy decoder replica came back"
    after = send(faults_url, chat("Hello again", 4, stream=False))
    assert (after.kind, after.tokens) == ("completed", 4)
    assert wait_for(lambda: unfinished_in_engine() == 0, timeout_s=10)


def test_shutdown_drains_the_streams_in_flight(faults_url):
    from ray import serve

    outcome: list[Outcome] = []
    stream = threading.Thread(
        target=lambda: outcome.append(send(faults_url, chat("Last words", 100, stream=True)))
    )
    stream.start()
    assert wait_for(lambda: unfinished_in_engine() == 1, timeout_s=30)
    serve.delete(APP)
    stream.join(HANG_S)
    assert outcome == [Outcome("completed", 200, None, 100, outcome[0].seconds_to_status)], outcome
