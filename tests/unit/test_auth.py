"""API keys: who gets in, what the refusal says, and that no key is ever echoed."""

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from serve.auth import API_KEYS_ENV, ApiKeyMiddleware, Unauthorized, api_keys, check_api_key
from serve.config import AppConfig

KEYS = (b"sk-first-key", b"sk-second-key")


@pytest.mark.parametrize(
    ("authorization", "query", "refusal"),
    [
        ("Bearer sk-first-key", b"", None),
        ("Bearer sk-second-key", b"", None),
        ("bearer   sk-first-key  ", b"", None),
        (None, b"", "no API key was sent"),
        ("", b"", "no API key was sent"),
        ("Bearer ", b"", "no API key was sent"),
        ("sk-first-key", b"", "no API key was sent"),
        ("Basic c2stZmlyc3Qta2V5", b"", "no API key was sent"),
        (None, b"api_key=sk-first-key", "API keys are not accepted in the URL"),
        (None, b"x=1&Key=sk-first-key", "API keys are not accepted in the URL"),
        ("Bearer sk-first-ke", b"", "the API key is not valid"),
        ("Bearer sk-first-key-and-more", b"", "the API key is not valid"),
        ("Bearer SK-FIRST-KEY", b"", "the API key is not valid"),
    ],
)
def test_only_a_configured_key_in_the_header_gets_in(authorization, query, refusal):
    if refusal is None:
        check_api_key(authorization, query, KEYS)
        return
    with pytest.raises(Unauthorized) as refused:
        check_api_key(authorization, query, KEYS)
    assert refusal in refused.value.message
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
    assert "sk-" not in refused.value.message


def test_without_keys_everything_passes():
    check_api_key(None, b"", ())


def test_keys_come_from_the_config_and_the_environment():
    environment = {API_KEYS_ENV: " sk-env-1, ,sk-env-2,sk-config "}
    assert api_keys(["sk-config", " "], environment) == (b"sk-config", b"sk-env-1", b"sk-env-2")
    assert api_keys([], {}) == ()


def test_config_keys_are_secret_in_its_repr():
    config = AppConfig.model_validate({"auth": {"api_keys": ["sk-very-secret"]}})
    assert "sk-very-secret" not in repr(config) and "sk-very-secret" not in str(config.model_dump())
    assert config.auth.api_keys[0].get_secret_value() == "sk-very-secret"


@pytest.fixture
def client(monkeypatch):
    monkeypatch.setattr(ApiKeyMiddleware, "keys", KEYS)

    async def ok(request):
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/health", ok), Route("/v1/models", ok)])
    app.add_middleware(ApiKeyMiddleware)
    return TestClient(app)


def test_the_refusal_is_an_openai_error_and_health_stays_open(client):
    refused = client.get("/v1/models", params={"api_key": "sk-first-key"})
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == "Bearer"
    assert refused.json() == {
        "error": {
            "message": "API keys are not accepted in the URL; send one in an Authorization header: "
            "`Authorization: Bearer YOUR_KEY`",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    assert client.get("/health").text == "ok"
    assert client.get("/v1/models", headers={"Authorization": "Bearer sk-second-key"}).text == "ok"
    wrong = client.get("/v1/models", headers={"Authorization": "Bearer sk-guess"})
    assert wrong.status_code == 401 and "sk-guess" not in wrong.text
