"""Autoscaling per stage, on real Ray Serve: our policies (autoscaling/policies.py) scale real replicas.

The application (`/scaling`) is the real one, ingress, preprocess and encoder,
with the stand-in decoder (deployments/batching_stand_in.py: continuous
batching timed by a cost model, no model; it reports the decoder's
autoscaling signals) in place of vLLM: a second engine start would cost the
suite a minute, and the decoder's signals are what the test is about. Delays
are seconds here (minutes in production), set by the test through the config.

- preprocess, on its ongoing requests: slow image fetches keep it busy, it
  goes from 1 to 2 replicas, and back to 1 once the load stops and the
  downscale delay has passed;
- decoder, on requests waiting for a batch slot: sustained load on a batch of
  2 makes requests wait, it goes from 1 to 2 replicas (scaling in is the
  same policy code, shown on preprocess).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from serve.config import AppConfig
from tests.integration.conftest import run_behind_the_front_door
from tests.integration.replicas import replica_names
from tests.polling import wait_for

pytestmark = pytest.mark.slow

APP = "scaling"
PREFIX = "/scaling"
FAST_DELAYS = {"upscale_delay_s": 2, "downscale_delay_s": 5, "look_back_period_s": 2}


@pytest.fixture(scope="module")
def scaling_url(ray_cluster, demo_checkpoint):
    from ray import serve

    from deployments.batching_stand_in import StandInBatchingDecoder
    from serve.app import build_stages

    config = AppConfig.model_validate(
        {
            "model": {"source": str(demo_checkpoint), "served_name": "demo"},
            "engine": {"max_num_seqs": 2},
            "images": {"allow_private_networks": True, "allowed_ports": [], "fetch_timeout_s": 10.0},
            "use_default_system_prompt": False,
            "deployments": {
                "ingress": {"num_cpus": 0},
                "preprocess": {
                    "num_replicas": None,
                    "num_cpus": 0,
                    "autoscaling": {
                        "min_replicas": 1,
                        "max_replicas": 2,
                        "target_ongoing_requests": 2,
                        **FAST_DELAYS,
                    },
                },
                "encoder": {"num_cpus": 0},
                "decoder": {
                    "num_replicas": None,
                    "num_cpus": 0,
                    "autoscaling": {
                        "min_replicas": 1,
                        "max_replicas": 2,
                        "target_waiting_requests": 1,
                        **FAST_DELAYS,
                    },
                },
            },
        }
    )
    yield run_behind_the_front_door(
        build_stages(config, StandInBatchingDecoder), APP, PREFIX, ray_cluster.base_url
    )
    serve.delete(APP)


def replicas(deployment: str) -> int:
    return len(replica_names(APP, deployment))


def chat(content, max_tokens: int) -> dict:
    return {"model": "demo", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}


def keep_busy(url: str, payload, clients: int, stop: threading.Event) -> list[int]:
    """`clients` clients sending `payload(i)` one after another until `stop`; their status codes."""
    statuses: list[int] = []

    def client(k: int) -> None:
        i = 0
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                statuses.append(http.post(f"{url}/v1/chat/completions", json=payload(k, i)).status_code)
                i += 1

    pool = ThreadPoolExecutor(clients)
    for k in range(clients):
        pool.submit(client, k)
    pool.shutdown(wait=False)
    return statuses


def test_preprocess_scales_out_under_image_load_and_back_after_the_delay(scaling_url, image_server):
    assert replicas("Preprocess") == 1
    stop = threading.Event()

    def slow_image(k: int, i: int) -> dict:
        image = {"type": "image_url", "image_url": {"url": image_server.url(f"slow/1.0?client={k}&i={i}")}}
        return chat([{"type": "text", "text": "Describe it."}, image], 2)

    statuses = keep_busy(scaling_url, slow_image, clients=6, stop=stop)
    try:
        assert wait_for(lambda: replicas("Preprocess") == 2, timeout_s=40)
    finally:
        stop.set()
    scaled_out_at = time.monotonic()
    assert wait_for(lambda: replicas("Preprocess") == 1, timeout_s=60)
    # Not before the downscale delay: the load's last requests end within ~2 s of the stop.
    assert time.monotonic() - scaled_out_at >= FAST_DELAYS["downscale_delay_s"] - 2
    assert statuses and set(statuses) == {200}


def test_decoder_scales_out_when_requests_wait_for_a_batch_slot(scaling_url):
    # The image load above can make requests wait for the decoder's 2 slots
    # too, so the decoder may still be at 2 until its downscale delay passes.
    assert wait_for(lambda: replicas("Decoder") == 1, timeout_s=60)
    stop = threading.Event()
    statuses = keep_busy(scaling_url, lambda k, i: chat(f"Request {k}-{i}", 64), clients=8, stop=stop)
    try:
        assert wait_for(lambda: replicas("Decoder") == 2, timeout_s=40)
    finally:
        stop.set()
    # Scaling back in is the same policy code as preprocess's (above), on other signals.
    assert statuses and set(statuses) == {200}
