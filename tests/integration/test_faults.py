"""Overload, time limits, lost replicas and shutdown: every request ends, none hangs.

These run on an application of their own (`/faults`): it has small queues
and a short time limit, and its replicas get killed, which the shared one
must not see. Its preprocess and encoder stages have two replicas each, as a
production service would: a retried request goes to the survivor at once,
instead of waiting, within the time limit, for Serve to start a replacement
on a loaded machine (in a full run that took more than 12 s); recovery by
replacement is the decoder's test. Every request here has a client-side
limit (`HANG_S`): one that reaches it counts as hung, and fails the test.

The encoder waits `ENCODER_BATCH_WAIT_S` for a batch to fill, so that a new
image stays in its replica long enough for a test to find it there: the
lost-encoder test kills the replica that holds a request, not one picked on
a timer.
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
from tests.integration.scrape import by_label, reached, settled
from tests.polling import wait_for

APP = "faults"
PREFIX = "/faults"
DECODER_SLOTS = 2
DECODER_QUEUE = 2
TIME_LIMIT_S = 12.0
RETRY_AFTER_S = 2
ENCODER_BATCH_WAIT_S = 1.0
ROUTING_STATS_PERIOD_S = 0.5
# The decoder's graceful_shutdown_timeout_s: well inside the time limit, so that the stream cut by
# the shutdown is told from one cut by the limit.
DECODER_GRACE_S = 4.0
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
    started_at: float = 0.0  # time.monotonic() when it was sent
    ended_at: float = 0.0  # ... and when its response ended (0 if it hung)

    @property
    def seconds_to_end(self) -> float:
        return self.ended_at - self.started_at


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
            "encoder": {"max_batch_size": 16, "batch_wait_timeout_s": ENCODER_BATCH_WAIT_S},
            "routing": {"stats_period_s": ROUTING_STATS_PERIOD_S},
            "deployments": {
                "ingress": {"num_cpus": 0},
                "preprocess": {"num_replicas": 2, "num_cpus": 0, "health_check_period_s": 1},
                "encoder": {"num_replicas": 2, "num_cpus": 0, "health_check_period_s": 1},
                "decoder": {
                    "num_cpus": 0,
                    "max_ongoing_requests": DECODER_SLOTS,
                    "max_queued_requests": DECODER_QUEUE,
                    "health_check_period_s": 1,
                    "graceful_shutdown_timeout_s": DECODER_GRACE_S,
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


def send(base_url: str, payload: dict, answered: threading.Event | None = None) -> Outcome:
    """One request, to its end: completed (tokens counted), an error (status or error event), or hung.

    `answered` is set once the response's status has arrived (for a stream: its first chunk
    was generated)."""
    started = time.monotonic()
    try:
        with (
            httpx.Client(timeout=HANG_S) as http,
            http.stream("POST", f"{base_url}/v1/chat/completions", json=payload) as response,
        ):
            to_status = time.monotonic() - started
            if answered is not None:
                answered.set()

            def ended(kind: str, status: int, code: str | None, tokens: int = 0) -> Outcome:
                retry_after = response.headers.get("retry-after")
                return Outcome(kind, status, code, tokens, to_status, retry_after, started, time.monotonic())

            if response.status_code != 200:
                error = json.loads(response.read())["error"]
                assert error["message"], error
                return ended("error", response.status_code, error["code"])
            if not payload["stream"]:
                return ended(
                    "completed", 200, None, json.loads(response.read())["usage"]["completion_tokens"]
                )
            tokens, done = 0, False
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    event = json.loads(line[len("data: ") :])
                    if "error" in event:
                        return ended("error", 200, event["error"]["code"] or event["error"]["type"])
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
            return ended("completed", 200, None, tokens) if done else ended("error", 200, "cut", tokens)
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


def kill_replica(name: str) -> None:
    """Kill the replica actor `name` (of `replica_names`); Serve replaces it, under a new name."""
    import ray

    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


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
    # At once: before any accepted request has finished, that is before a slot or a queue place
    # could have freed up for a refused request to wait for.
    first_finished_s = min(o.seconds_to_end for o in accepted)
    for outcome in refused:
        assert outcome.code == "overloaded"
        assert outcome.retry_after == str(RETRY_AFTER_S)
        assert outcome.seconds_to_status < first_finished_s, (outcome, first_finished_s)
    assert all(o.tokens == 48 for o in accepted), accepted


def test_a_request_past_the_time_limit_is_stopped_in_the_engine(faults_url):
    # Far more tokens than fit in the time limit.
    started = time.monotonic()
    streamed, whole = send_all(
        faults_url, [chat("Go on.", 4000, stream=True), chat("Go on.", 4000, stream=False)]
    )
    elapsed = time.monotonic() - started
    assert (streamed.kind, streamed.status, streamed.code) == ("error", 200, "request_timeout"), streamed
    assert (whole.kind, whole.status, whole.code) == ("error", 504, "request_timeout"), whole
    assert TIME_LIMIT_S <= elapsed < TIME_LIMIT_S + 10


def test_the_time_limit_counts_from_arrival_not_from_decoding(faults_url, image_server):
    # Its image takes 4 s to fetch: the engine gets what is left of the limit, not all of it.
    image = image_content(image_server.url("slow/4?time-limit"))
    started = time.monotonic()
    outcome = send(faults_url, chat(image, 4000, stream=False))
    elapsed = time.monotonic() - started
    assert (outcome.kind, outcome.status, outcome.code) == ("error", 504, "request_timeout"), outcome
    assert TIME_LIMIT_S <= elapsed < TIME_LIMIT_S + 3, elapsed
    assert wait_for(lambda: unfinished_in_engine() == 0, timeout_s=10), "the engine kept generating"


ENCODED = "ray_ministral_encoder_images_encoded_total"
CACHE_HITS = "ray_ministral_encoder_cache_hits_total"


def per_encoder_replica(samples, name: str) -> dict[str, float]:
    return by_label(samples, name, "replica", application=APP)


def increase(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {
        replica: after[replica] - before.get(replica, 0.0)
        for replica in after
        if after[replica] > before.get(replica, 0.0)
    }


def encoder_replica(replica_id: str) -> str:
    """The actor name of the encoder replica a metric's `replica` label names."""
    (name,) = [name for name in replica_names(APP, "Encoder") if name.endswith(f"#{replica_id}")]
    return name


def test_images_go_where_their_embedding_is_and_new_ones_to_the_less_loaded_encoder(faults_url, ray_cluster):
    assert len(replica_names(APP, "Encoder")) == 2
    known, new, another = (image_content(unique_image(i))[1:] for i in (1000, 1001, 1002))

    def counts(*names):
        samples = settled(ray_cluster.metrics_url)
        return [per_encoder_replica(samples, name) for name in names]

    encoded_before, hits_before = counts(ENCODED, CACHE_HITS)
    assert send(faults_url, chat(known, 2, stream=False)).kind == "completed"
    encoded = reached(
        ray_cluster.metrics_url,
        lambda samples: sum(per_encoder_replica(samples, ENCODED).values()) > sum(encoded_before.values()),
    )
    (holder,) = increase(encoded_before, per_encoder_replica(encoded, ENCODED))
    # The routers poll each replica's stats every ROUTING_STATS_PERIOD_S: the holder's measured
    # speed and its cache reach them (nothing to wait on but their period).
    time.sleep(3 * ROUTING_STATS_PERIOD_S)

    with ThreadPoolExecutor(3) as pool:
        # The known image and a new one: the holder has half of it, so it goes there, and its new
        # image waits ENCODER_BATCH_WAIT_S in the holder.
        loading = pool.submit(send, faults_url, chat([*known, *new], 2, stream=False))
        assert wait_for(lambda: ongoing_requests(encoder_replica(holder)) > 0, interval_s=0.05)
        # Meanwhile: the known image again, still worth the holder's short queue; a new one, not.
        repeated = pool.submit(send, faults_url, chat(known, 2, stream=False))
        fresh = pool.submit(send, faults_url, chat(another, 2, stream=False))
        assert [f.result().kind for f in (loading, repeated, fresh)] == ["completed"] * 3

    encoded_after, hits_after = counts(ENCODED, CACHE_HITS)
    assert increase(hits_before, hits_after) == {holder: 2}
    (other,) = {name.rsplit("#", 1)[1] for name in replica_names(APP, "Encoder")} - {holder}
    assert increase(encoded_before, encoded_after) == {holder: 2, other: 1}


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


def ongoing_requests(replica: str) -> int:
    """What Serve counts as in `replica` (a replica actor's name): running or waiting in it."""
    import ray

    return ray.get(ray.get_actor(replica, namespace="serve").get_num_ongoing_requests.remote(), timeout=10)


def test_a_lost_encoder_replica_is_retried(faults_url):
    # New images: each waits ENCODER_BATCH_WAIT_S in its encoder replica, where it is killed.
    payloads = [chat(image_content(unique_image(i)), 4, stream=i % 2 == 0) for i in range(4)]
    holding: list[str] = []

    def a_replica_holds_a_request() -> bool:
        holding[:] = [r for r in replica_names(APP, "Encoder") if ongoing_requests(r) > 0]
        return bool(holding)

    with ThreadPoolExecutor(1) as sender:
        sending = sender.submit(send_all, faults_url, payloads)
        assert wait_for(a_replica_holds_a_request, timeout_s=30, interval_s=0.05)
        kill_replica(holding[0])
        outcomes = sending.result()
    assert [o.kind for o in outcomes] == ["completed"] * 4, outcomes
    assert all(o.tokens == 4 for o in outcomes)
    assert holding[0] not in replica_names(APP, "Encoder")


def test_a_lost_decoder_ends_its_requests_with_errors_and_the_service_recovers(faults_url):
    payloads = [chat(f"Story {i}", 3000, stream=i % 2 == 0) for i in range(DECODER_SLOTS)]
    (decoder,) = replica_names(APP, "Decoder")
    streaming = threading.Event()
    with ThreadPoolExecutor(2) as sender:
        sending = [
            sender.submit(send, faults_url, payloads[0], streaming),
            sender.submit(send, faults_url, payloads[1]),
        ]
        # Killed with both requests inside it, the stream answered with its first chunk.
        assert streaming.wait(30)
        assert wait_for(lambda: ongoing_requests(decoder) == DECODER_SLOTS, timeout_s=30, interval_s=0.05)
        kill_replica(decoder)
        outcomes = [future.result() for future in sending]
    assert [(o.kind, o.status) for o in outcomes] == [("error", 200), ("error", 503)], outcomes
    # The stream ends with an error event, not merely cut off.
    assert outcomes[0].code == "service_unavailable", outcomes
    # Serve notices the lost replica at its next health check (every second here).
    seen: list[httpx.Response] = []
    assert wait_for(lambda: seen.append(health(faults_url)) or seen[-1].status_code == 503, timeout_s=15)
    assert seen[-1].json()["stages"]["decoder"].startswith("no running replica")
    assert seen[-1].json()["stages"]["encoder"] == "ok"
    assert recovered(faults_url, "Decoder", decoder), "no healthy decoder replica came back"
    after = send(faults_url, chat("Hello again", 4, stream=False))
    assert (after.kind, after.tokens) == ("completed", 4)
    assert wait_for(lambda: unfinished_in_engine() == 0, timeout_s=10)


def test_shutdown_drains_the_streams_in_flight_for_the_grace_period(faults_url):
    from ray import serve

    with ThreadPoolExecutor(1) as sender:
        # A short stream, done within the decoder's grace period, and one that outlasts it.
        sending = sender.submit(
            send_all, faults_url, [chat("Last words", 100, stream=True), chat("Go on.", 4000, stream=True)]
        )
        # Asked of the replica actor: a call through the decoder's handle would wait for a slot.
        (decoder,) = replica_names(APP, "Decoder")
        assert wait_for(lambda: ongoing_requests(decoder) == 2, timeout_s=30, interval_s=0.05)
        deleting = time.monotonic()
        # It returns once the ingress has drained too, behind HAProxy 10 s at least.
        serve.delete(APP)
        short, long = sending.result()
    assert (short.kind, short.tokens) == ("completed", 100), short
    # Its error event came when the grace period ran out, before the time limit could have cut it.
    assert (long.kind, long.code) == ("error", "service_unavailable"), long
    assert DECODER_GRACE_S <= long.ended_at - deleting < TIME_LIMIT_S - 2, long.ended_at - deleting
