"""A client that goes away frees its request in the engine: mid-stream, or while it waits for a
whole reply."""

import json
import socket
from urllib.parse import urlsplit

import httpx

from tests.polling import wait_for

ABORT_WITHIN_S = 5


def unfinished(decoder_handle) -> int:
    return decoder_handle.num_unfinished_requests.remote().result(timeout_s=30)


def test_disconnect_aborts_the_engine_request(service, decoder_handle):
    assert wait_for(lambda: unfinished(decoder_handle) == 0)
    payload = {
        "model": service.model,
        "messages": [{"role": "user", "content": "Go on forever."}],
        "max_tokens": 1900,
        # vLLM's extension: the end-of-sequence token does not end it early.
        "ignore_eos": True,
        "stream": True,
    }
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", f"{service.base_url}/v1/chat/completions", json=payload) as response,
    ):
        assert response.status_code == 200
        # Held in a variable: a `for` loop left with `break` would drop the
        # line iterator, and closing it closes the connection too early.
        lines = response.iter_lines()
        chunks = (json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: {"))
        for _ in range(3):
            assert next(chunks)["choices"][0].get("finish_reason") is None
        assert unfinished(decoder_handle) == 1
    # The connection is closed here, long before 1900 tokens: generating the rest would take the
    # demo engine about 17 s (9 ms a token, more on a slower machine), so a request still in the
    # engine after 5 s was not aborted.
    assert wait_for(lambda: unfinished(decoder_handle) == 0, timeout_s=ABORT_WITHIN_S), (
        "the engine kept generating for a gone client"
    )


def test_a_client_gone_before_its_whole_reply_frees_the_engine_request(service, decoder_handle):
    assert wait_for(lambda: unfinished(decoder_handle) == 0)
    body = json.dumps(
        {
            "model": service.model,
            "messages": [{"role": "user", "content": "Go on forever."}],
            "max_tokens": 1900,
            "ignore_eos": True,
        }
    ).encode()
    address = urlsplit(service.base_url)
    with socket.create_connection((address.hostname, address.port), timeout=30) as client:
        client.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert wait_for(lambda: unfinished(decoder_handle) == 1, timeout_s=30)
    # Gone with nothing read (the reply would take about 17 s).
    assert wait_for(lambda: unfinished(decoder_handle) == 0, timeout_s=ABORT_WITHIN_S), (
        "the engine kept generating for a gone client"
    )
