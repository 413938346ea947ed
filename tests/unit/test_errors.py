"""Client input quoted back in an error is cut to 80 characters (serve.errors.echoed), in what the
ingress answers: a long model name, path or method comes back as its first 77 characters and
"...", with its length; a short one comes back whole."""

from __future__ import annotations

import re

import pytest

from serve.errors import ModelNotFound, echoed
from tests.unit.ingress_app import MODEL, ingress_client

LIMIT = 80


def quoted_cut(text: str) -> str:
    """How a text past the limit is quoted: 80 characters, the last three an ellipsis."""
    return f"{text[: LIMIT - 3]}... ({len(text)} characters)"


@pytest.mark.parametrize("length", [0, 1, LIMIT - 1, LIMIT])
def test_a_text_within_the_limit_comes_back_whole(length):
    text = "".join(chr(ord("a") + i % 26) for i in range(length))
    assert echoed(text) == text


@pytest.mark.parametrize("length", [LIMIT + 1, 1000, 1_000_000])
def test_a_text_past_the_limit_is_cut_to_80_characters(length):
    text = "".join(chr(ord("a") + i % 26) for i in range(length))
    cut = echoed(text)
    quoted, _, rest = cut.partition("... ")
    assert len(quoted) + len("...") == LIMIT and text.startswith(quoted)
    assert rest == f"({length} characters)"
    assert cut == quoted_cut(text)


def test_a_long_model_name_is_cut_and_a_short_one_whole():
    long_name = "m" * 5000
    assert quoted_cut(long_name) in ModelNotFound(long_name, ["served"]).message
    assert long_name[:LIMIT] not in ModelNotFound(long_name, ["served"]).message
    assert "'gpt-4o'" in ModelNotFound("gpt-4o", ["served"]).message


def error_message(response) -> str:
    return response.json()["error"]["message"]


def test_the_ingress_quotes_back_long_models_paths_and_methods_cut(monkeypatch):
    long_model, long_path, long_method = "q" * 3000, "/" + "p" * 5000, "M" * 300
    with ingress_client(monkeypatch) as client:
        model = client.post(
            "/v1/chat/completions",
            json={"model": long_model, "messages": [{"role": "user", "content": "hi"}]},
        )
        path = client.get(long_path)
        method = client.request(long_method, "/v1/models")
        short_model = client.post(
            "/v1/chat/completions", json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
        )
        short_path = client.get("/v2/chat")
        short_method = client.request("PATCH", "/v1/models")
    assert model.status_code == 404 and quoted_cut(long_model) in error_message(model)
    assert path.status_code == 404 and quoted_cut(long_path) in error_message(path)
    assert method.status_code == 405 and quoted_cut(long_method) in error_message(method)
    for response, long_text, letter in [
        (model, long_model, "q"),
        (path, long_path, "p"),
        (method, long_method, "M"),
    ]:
        # Nothing of the input beyond its first 77 characters, and a short answer.
        longest_run = max(len(run) for run in re.findall(f"{letter}+", error_message(response)))
        assert longest_run == long_text[: LIMIT - 3].count(letter) and len(error_message(response)) < 200
    assert "'gpt-4o'" in error_message(short_model) and MODEL in error_message(short_model)
    assert error_message(short_path) == "GET /v2/chat is not an endpoint of this service"
    assert error_message(short_method) == "PATCH is not allowed on /v1/models"
