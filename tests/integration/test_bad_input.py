"""A corpus of malformed requests: each is a 4xx with an OpenAI-shaped message, and no replica suffers.

The whole corpus goes to the shared service; afterwards it is healthy and
runs the very replicas it ran before (none crashed and was replaced).
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.image_server import data_url, image_bytes
from tests.integration.conftest import APP_NAME
from tests.integration.replicas import replica_names

USER = {"role": "user", "content": "hi"}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def chat(**fields) -> dict:
    return {"model": "demo", "messages": [USER], **fields}


def with_image(url) -> dict:
    return chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])


def nested_schema(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def tool_with(parameters) -> dict:
    return {"type": "function", "function": {"name": "f", "parameters": parameters}}


# 5,000,000 five-digit token ids: 28.6 MiB bodies, within limits.max_request_bytes.
FIVE_MILLION_TOKEN_IDS = ",".join(str(10_000 + i % 90_000) for i in range(5_000_000))
FIVE_MILLION_TOKENS = f'{{"model": "demo", "tokens": [{FIVE_MILLION_TOKEN_IDS}]}}'.encode()
FIVE_MILLION_TOKENS_PROMPT = f'{{"model": "demo", "prompt": [{FIVE_MILLION_TOKEN_IDS}]}}'.encode()

# (name, method, path, body: dict | bytes | None, expected status)
CORPUS = [
    ("empty body", "POST", "/v1/chat/completions", b"", 400),
    ("not JSON", "POST", "/v1/chat/completions", b"{not json", 400),
    ("a JSON array", "POST", "/v1/chat/completions", b"[1, 2]", 400),
    ("a JSON string", "POST", "/v1/chat/completions", b'"hello"', 400),
    ("invalid UTF-8", "POST", "/v1/chat/completions", b'{"model": "\xff\xfe"}', 400),
    ("nested past the parser", "POST", "/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000, 400),
    ("a body over the limit", "POST", "/v1/chat/completions", b" " * (33 * 1024 * 1024), 413),
    ("no messages", "POST", "/v1/chat/completions", {"model": "demo"}, 400),
    ("messages not a list", "POST", "/v1/chat/completions", chat(messages="hi"), 400),
    ("no message at all", "POST", "/v1/chat/completions", chat(messages=[]), 400),
    (
        "an unknown role",
        "POST",
        "/v1/chat/completions",
        chat(messages=[{"role": "wizard", "content": "x"}]),
        400,
    ),
    ("a message without a role", "POST", "/v1/chat/completions", chat(messages=[{"content": "x"}]), 400),
    (
        "content a number",
        "POST",
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": 5}]),
        400,
    ),
    (
        "an audio part",
        "POST",
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]),
        400,
    ),
    (
        "a text part without text",
        "POST",
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": [{"type": "text"}]}]),
        400,
    ),
    (
        "an image part without a URL",
        "POST",
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        400,
    ),
    ("an image URL not a string", "POST", "/v1/chat/completions", with_image(42), 400),
    (
        "an image in an assistant turn",
        "POST",
        "/v1/chat/completions",
        chat(
            messages=[
                USER,
                {
                    "role": "assistant",
                    "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}],
                },
                USER,
            ]
        ),
        400,
    ),
    (
        "a data URL of broken base64",
        "POST",
        "/v1/chat/completions",
        with_image("data:image/png;base64,%%%"),
        400,
    ),
    (
        "a data URL of text",
        "POST",
        "/v1/chat/completions",
        with_image(data_url(b"this is not an image", "image/png")),
        400,
    ),
    ("a file URL", "POST", "/v1/chat/completions", with_image("file:///etc/passwd"), 400),
    ("an FTP URL", "POST", "/v1/chat/completions", with_image("ftp://127.0.0.1/a.png"), 400),
    ("a URL without a host", "POST", "/v1/chat/completions", with_image("http:///a.png"), 400),
    (
        "too many images",
        "POST",
        "/v1/chat/completions",
        chat(
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": data_url(image_bytes())}}] * 7,
                }
            ]
        ),
        400,
    ),
    (
        "an image over the byte limit",
        "POST",
        "/v1/chat/completions",
        with_image(data_url(image_bytes(size=(900, 900), fmt="BMP"), "image/bmp")),
        400,
    ),
    (
        "a tool turn without its call id",
        "POST",
        "/v1/chat/completions",
        chat(messages=[{"role": "tool", "content": "1"}]),
        400,
    ),
    (
        "tool calls in a user turn",
        "POST",
        "/v1/chat/completions",
        chat(
            messages=[
                {
                    "role": "user",
                    "content": "x",
                    "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "{}"}}],
                }
            ]
        ),
        400,
    ),
    ("max_tokens a word", "POST", "/v1/chat/completions", chat(max_tokens="many"), 400),
    ("max_tokens zero", "POST", "/v1/chat/completions", chat(max_tokens=0), 400),
    ("max_tokens past the context", "POST", "/v1/chat/completions", chat(max_tokens=5000), 400),
    (
        "a prompt past the context",
        "POST",
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": "word " * 2100}]),
        400,
    ),
    ("a negative temperature", "POST", "/v1/chat/completions", chat(temperature=-1), 400),
    ("a temperature of 3", "POST", "/v1/chat/completions", chat(temperature=3), 400),
    ("top_p zero", "POST", "/v1/chat/completions", chat(top_p=0), 400),
    ("n zero", "POST", "/v1/chat/completions", chat(n=0), 400),
    ("n past the limit", "POST", "/v1/chat/completions", chat(n=17), 400),
    (
        "seventeen stop sequences",
        "POST",
        "/v1/chat/completions",
        chat(stop=[f"s{i}" for i in range(17)]),
        400,
    ),
    ("a stop sequence past the limit", "POST", "/v1/chat/completions", chat(stop="x" * 300), 400),
    ("an empty stop sequence", "POST", "/v1/chat/completions", chat(stop=""), 400),
    ("logit_bias keyed by words", "POST", "/v1/chat/completions", chat(logit_bias={"hello": 1}), 400),
    ("a logit_bias of 300", "POST", "/v1/chat/completions", chat(logit_bias={"12": 300}), 400),
    (
        "301 logit_bias entries",
        "POST",
        "/v1/chat/completions",
        chat(logit_bias={str(i): 1 for i in range(301)}),
        400,
    ),
    (
        "logit_bias past the vocabulary",
        "POST",
        "/v1/chat/completions",
        chat(logit_bias={"999999999": 1}),
        400,
    ),
    ("top_logprobs without logprobs", "POST", "/v1/chat/completions", chat(top_logprobs=3), 400),
    ("top_logprobs of 30", "POST", "/v1/chat/completions", chat(logprobs=True, top_logprobs=30), 400),
    (
        "129 tools",
        "POST",
        "/v1/chat/completions",
        chat(tools=[{"type": "function", "function": {"name": f"t{i}"}} for i in range(129)]),
        400,
    ),
    (
        "a tool name with spaces",
        "POST",
        "/v1/chat/completions",
        chat(tools=[{"type": "function", "function": {"name": "get weather"}}]),
        400,
    ),
    ("two tools of one name", "POST", "/v1/chat/completions", chat(tools=[TOOL, TOOL]), 400),
    ("tool_choice required without tools", "POST", "/v1/chat/completions", chat(tool_choice="required"), 400),
    (
        "tool_choice naming a missing tool",
        "POST",
        "/v1/chat/completions",
        chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "nope"}}),
        400,
    ),
    (
        "a tool schema nested too deep",
        "POST",
        "/v1/chat/completions",
        chat(tools=[tool_with(nested_schema(40))]),
        400,
    ),
    (
        "a tool schema too large",
        "POST",
        "/v1/chat/completions",
        chat(tools=[tool_with({"type": "object", "description": "x" * 70_000})]),
        400,
    ),
    (
        "a tool schema of no known type",
        "POST",
        "/v1/chat/completions",
        chat(tools=[tool_with({"type": "nonsense"})]),
        400,
    ),
    (
        "a response_format of yaml",
        "POST",
        "/v1/chat/completions",
        chat(response_format={"type": "yaml"}),
        400,
    ),
    (
        "a json_schema response_format without a schema",
        "POST",
        "/v1/chat/completions",
        chat(response_format={"type": "json_schema"}),
        400,
    ),
    (
        "a json_schema that cannot be enforced",
        "POST",
        "/v1/chat/completions",
        chat(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "r", "schema": {"type": "object", "minProperties": "two"}},
            }
        ),
        400,
    ),
    (
        "stream_options without stream",
        "POST",
        "/v1/chat/completions",
        chat(stream_options={"include_usage": True}),
        400,
    ),
    (
        "legacy functions",
        "POST",
        "/v1/chat/completions",
        chat(functions=[{"name": "f", "parameters": {}}]),
        400,
    ),
    ("a model not served", "POST", "/v1/chat/completions", chat(model="gpt-4o"), 404),
    ("a model name of a megabyte", "POST", "/v1/chat/completions", chat(model="m" * 1_000_000), 404),
    ("stream as a string", "POST", "/v1/chat/completions", chat(stream="yes"), 400),
    ("max_tokens as a string", "POST", "/v1/chat/completions", chat(max_tokens="5"), 400),
    (
        "a user message of null content",
        "POST",
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": None}]),
        400,
    ),
    (
        "a user message without content",
        "POST",
        "/v1/chat/completions",
        chat(messages=[{"role": "user"}]),
        400,
    ),
    (
        "a logit_bias key of a superscript two",
        "POST",
        "/v1/chat/completions",
        chat(logit_bias={"\u00b2": 1}),
        400,
    ),
    (
        "a logit_bias key of 5,000 digits",
        "POST",
        "/v1/chat/completions",
        chat(logit_bias={"9" * 5000: 1}),
        400,
    ),
    (
        "a seed of 5,000 digits",
        "POST",
        "/v1/chat/completions",
        json.dumps(chat()).encode()[:-1] + b', "seed": ' + b"9" * 5000 + b"}",
        400,
    ),
    (
        "sixteen choices of 1,000 tokens with 20 log-probabilities each",
        "POST",
        "/v1/chat/completions",
        chat(n=16, max_tokens=1000, logprobs=True, top_logprobs=20),
        400,
    ),
    (
        "completions of token ids past the vocabulary",
        "POST",
        "/v1/completions",
        {"model": "demo", "prompt": [1, 10**9]},
        400,
    ),
    ("completions of an empty prompt", "POST", "/v1/completions", {"model": "demo", "prompt": ""}, 400),
    ("completions of 5,000,000 token ids", "POST", "/v1/completions", FIVE_MILLION_TOKENS_PROMPT, 400),
    ("detokenize of 5,000,000 token ids", "POST", "/detokenize", FIVE_MILLION_TOKENS, 400),
    (
        "tokenize past the context with each token's text",
        "POST",
        "/tokenize",
        {"model": "demo", "prompt": "word " * 5000, "return_token_strs": True},
        400,
    ),
    (
        "completions with a suffix",
        "POST",
        "/v1/completions",
        {"model": "demo", "prompt": "a", "suffix": "b"},
        400,
    ),
    ("GET on chat completions", "GET", "/v1/chat/completions", None, 405),
    ("embeddings", "POST", "/v1/embeddings", {"model": "demo", "input": "hi"}, 400),
    ("a path that does not exist", "POST", "/v2/chat", chat(), 404),
    ("tokenize without a prompt", "POST", "/tokenize", {"model": "demo"}, 400),
    ("detokenize past the vocabulary", "POST", "/detokenize", {"model": "demo", "tokens": [10**9]}, 400),
]


def test_the_corpus_is_large_and_its_names_unique():
    names = [name for name, *_ in CORPUS]
    assert len(names) >= 50
    assert len(set(names)) == len(names)


def test_every_malformed_request_is_a_4xx_with_a_message_and_no_replica_restarts(service):
    from ray import serve

    before = replica_names(APP_NAME)
    assert before, "no replica of the shared application found"
    answers = {}
    with httpx.Client(base_url=service.base_url, timeout=60) as http:
        for name, method, path, body, _ in CORPUS:
            content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
            response = http.request(
                method, path, content=content, headers={"Content-Type": "application/json"}
            )
            answers[name] = response
    wrong = {
        name: (answers[name].status_code, answers[name].text[:300])
        for name, _, _, _, status in CORPUS
        if answers[name].status_code != status
    }
    assert not wrong, wrong
    assert len(answers["a model name of a megabyte"].content) < 1000, "the model name was echoed whole"
    for field, name in [
        ("tokens", "detokenize of 5,000,000 token ids"),
        ("prompt", "completions of 5,000,000 token ids"),
    ]:
        assert answers[name].json()["error"]["param"] == field
        assert answers[name].json()["error"]["code"] == "context_length_exceeded"
    for name, response in answers.items():
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, name
        assert error["message"] and error["type"] == "invalid_request_error", (name, error)
    assert httpx.get(f"{service.base_url}/health", timeout=30).status_code == 200
    assert replica_names(APP_NAME) == before
    status = serve.status().applications[APP_NAME]
    assert status.status == "RUNNING"
    assert {name: d.status for name, d in status.deployments.items()} == dict.fromkeys(
        status.deployments, "HEALTHY"
    )


@pytest.mark.parametrize("declared", ["50000000", "99999999999"])
def test_a_declared_body_over_the_limit_is_refused_before_it_is_sent(service, declared):
    """The 413 arrives while the client still holds almost all of the body."""
    import socket
    from urllib.parse import urlsplit

    address = urlsplit(service.base_url)
    with socket.create_connection((address.hostname, address.port), timeout=30) as connection:
        connection.sendall(
            (
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: {address.hostname}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
            ).encode()
            + b"{"
        )
        reply = connection.makefile("rb")
        status = reply.readline().decode()
        headers = {}
        while (line := reply.readline().decode().strip()) != "":
            name, _, value = line.partition(":")
            headers[name.lower()] = value.strip()
        body = json.loads(reply.read(int(headers["content-length"])))
    assert status.startswith("HTTP/1.1 413"), status
    assert "limits.max_request_bytes" in body["error"]["message"]
