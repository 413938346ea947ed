"""What one request can cost the shared service: hostile inputs that are small on the wire do not
grow the resident memory of the stage that handles them, and a huge body does not stall the
replica that refuses it (docs/reliability.md lists the limits behind each)."""

from __future__ import annotations

import io
import json
import threading
import time

import httpx
import psutil
import pytest
from PIL import Image

from tests.image_server import data_url
from tests.integration.conftest import APP_NAME
from tests.integration.test_bad_input import FIVE_MILLION_TOKENS

pytestmark = pytest.mark.slow

# Growth of a stage's resident memory that a refused request may leave or pass through.
RSS_GROWTH_LIMIT_MIB = 64


def stage_rss_mib(deployment: str) -> float:
    """Resident memory (MiB) of the replicas of one deployment of the shared application: Ray
    titles each replica's process `ray::ServeReplica:APP:DEPLOYMENT`, and the suite's Ray runs
    under this process."""
    title = f"ServeReplica:{APP_NAME}:{deployment}"
    total = 0
    for process in psutil.Process().children(recursive=True):
        try:
            if title in " ".join(process.cmdline()):
                total += process.memory_info().rss
        except psutil.Error:
            continue
    assert total, f"no process of {deployment} found"
    return total / 2**20


def image_message(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]


def tiny_huge_png() -> bytes:
    """A 1-bit PNG of 6,300 x 6,300 pixels: about 5 KiB that decode to 40 megapixels."""
    buffer = io.BytesIO()
    Image.new("1", (6300, 6300)).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def unusable_tools(serial: int, description_chars: int) -> list[dict]:
    """A tool with a long description and a schema no grammar can be made of: refused with a 400."""
    return [
        {
            "type": "function",
            "function": {
                "name": f"t{serial}",
                "description": "x" * description_chars,
                "parameters": {"type": "nonsense"},
            },
        }
    ]


def growth_over(deployment: str, send_one, times: int) -> float:
    """RSS growth of `deployment` (MiB) over `times` calls of `send_one`, after one to warm up."""
    send_one(0)
    before = stage_rss_mib(deployment)
    for serial in range(1, times + 1):
        send_one(serial)
    return stage_rss_mib(deployment) - before


def post_chat(service, **fields) -> httpx.Response:
    body = {"model": service.model, "max_tokens": 4, **fields}
    return httpx.post(f"{service.openai_url}/chat/completions", json=body, timeout=60)


def assert_refused(response: httpx.Response, param_prefix: str) -> None:
    assert response.status_code == 400, response.text[:300]
    assert (response.json()["error"]["param"] or "").startswith(param_prefix), response.text[:300]


def test_stacked_compression_from_an_image_host_costs_nothing(service, image_server):
    """980 bytes of `Content-Encoding: gzip, gzip` that inflate to 512 MiB."""

    def send_one(serial: int) -> None:
        url = image_server.url(f"gzip/2/{512 * 2**20}?{serial}")
        assert_refused(post_chat(service, messages=image_message(url)), "messages[0].content[0]")

    growth = growth_over("Preprocess", send_one, times=3)
    assert growth < RSS_GROWTH_LIMIT_MIB, f"preprocess grew {growth:.0f} MiB"


def test_a_tiny_image_of_huge_dimensions_costs_nothing(service):
    png = tiny_huge_png()
    assert len(png) < 16 * 1024

    def send_one(serial: int) -> None:
        # Another byte after the image's end makes each request new to the preprocess cache.
        url = data_url(png + bytes([serial]))
        assert_refused(post_chat(service, messages=image_message(url)), "messages[0].content[0]")

    growth = growth_over("Preprocess", send_one, times=3)
    assert growth < RSS_GROWTH_LIMIT_MIB, f"preprocess grew {growth:.0f} MiB"


def test_a_flood_of_large_refused_tools_does_not_fill_the_grammar_cache(service):
    """Each request carries 30 MB of tool description; the ingress must not keep any of it."""

    def send_one(serial: int) -> None:
        response = post_chat(
            service, messages=[{"role": "user", "content": "hi"}], tools=unusable_tools(serial, 30_000_000)
        )
        assert_refused(response, "tools[0].function.parameters")

    growth = growth_over("Ingress", send_one, times=4)
    assert growth < RSS_GROWTH_LIMIT_MIB, f"the ingress grew {growth:.0f} MiB"


def health_latencies_while(service, send) -> tuple[httpx.Response, list[float]]:
    """`send()`'s response, and how long each /health took, polled every 20 ms meanwhile."""
    health_latencies: list[float] = []
    done = threading.Event()

    def poll_health() -> None:
        with httpx.Client(base_url=service.base_url, timeout=30) as http:
            while not done.is_set():
                started = time.perf_counter()
                assert http.get("/health").status_code == 200
                health_latencies.append(time.perf_counter() - started)
                time.sleep(0.02)

    poller = threading.Thread(target=poll_health, daemon=True)
    poller.start()
    try:
        time.sleep(0.3)
        response = send()
        time.sleep(0.3)
    finally:
        done.set()
        poller.join(timeout=30)
    assert len(health_latencies) >= 10
    return response, health_latencies


def test_health_answers_while_a_huge_token_list_is_refused(service):
    """A 28.6 MiB /detokenize body of 5,000,000 token ids once held /health for 2.1 s."""
    body = FIVE_MILLION_TOKENS.replace(b'"demo"', json.dumps(service.model).encode())
    response, health_latencies = health_latencies_while(
        service,
        lambda: httpx.post(
            f"{service.base_url}/detokenize",
            content=body,
            headers={"Content-Type": "application/json"},
            timeout=60,
        ),
    )
    assert response.status_code == 400, response.text[:300]
    assert response.json()["error"]["param"] == "tokens"
    assert max(health_latencies) < 0.25, f"/health took up to {max(health_latencies) * 1000:.0f} ms"


def test_health_answers_while_a_huge_text_is_tokenized(service):
    """Tokenising more than TOKENIZE_INLINE_CHARS runs off the ingress's event loop: this text
    takes the tokeniser about 5 s, which inline would be a 5 s stall of /health (the tokeniser
    holds the GIL in stretches, hence a looser bound than for parsing)."""
    text = " ".join(f"word{i}" for i in range(1_500_000))  # about 15 MB, well past the context
    response, health_latencies = health_latencies_while(
        service,
        lambda: httpx.post(
            f"{service.base_url}/tokenize", json={"model": service.model, "prompt": text}, timeout=120
        ),
    )
    assert response.status_code == 400, response.text[:300]
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert max(health_latencies) < 1.0, f"/health took up to {max(health_latencies) * 1000:.0f} ms"
