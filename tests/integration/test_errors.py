"""Bad requests get OpenAI-shaped 4xx errors naming the problem, and the service stays up."""

import httpx
import openai
import pytest


def post(service, payload=None, content=None):
    return httpx.post(
        f"{service.base_url}/v1/chat/completions",
        json=payload,
        content=content,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )


def assert_openai_error(response, status, param, text):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert text in error["message"]
    return error


USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("payload", "content", "status", "param", "text"),
    [
        (None, b'{"model": "demo", "messages": [', 400, None, "not valid JSON"),
        ({"model": "demo"}, None, 400, "messages", "messages"),
        ({"model": "demo", "messages": "hi"}, None, 400, "messages", "messages"),
        ({"model": "demo", "messages": USER, "max_tokens": "many"}, None, 400, "max_tokens", "integer"),
        ({"model": "demo", "messages": USER, "temperature": -1}, None, 400, "temperature", "temperature"),
        ({"model": "gpt-4o", "messages": USER}, None, 404, "model", "gpt-4o"),
        ({"model": "demo", "messages": USER, "max_tokens": 5000}, None, 400, "max_tokens", "2048"),
        (
            {"model": "demo", "messages": [{"role": "user", "content": "word " * 2100}]},
            None,
            400,
            "messages",
            "2048",
        ),
        (
            {"model": "demo", "messages": USER, "functions": [{"name": "f", "parameters": {}}]},
            None,
            400,
            "functions",
            "not supported",
        ),
    ],
)
def test_bad_request_then_service_still_answers(client, service, payload, content, status, param, text):
    assert_openai_error(post(service, payload, content), status, param, text)
    healthy = client.chat.completions.create(model=service.model, messages=USER, max_tokens=2)
    assert healthy.usage.completion_tokens == 2


def test_unknown_path_is_an_openai_404(service):
    response = httpx.get(f"{service.base_url}/v1/nonexistent", timeout=30)
    assert_openai_error(response, 404, None, "/v1/nonexistent")


def test_openai_client_raises_the_typed_errors(client, service):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=USER)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=service.model, messages=USER, max_tokens=10**6)
