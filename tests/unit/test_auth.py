"""API keys: who gets in, what the refusal says, and that no key is ever echoed."""

import re

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from serve import ingress
from serve.auth import API_KEYS_ENV, TenantMiddleware, Unauthorized, api_keys, identify, tenant_of
from serve.config import AppConfig
from serve.tenants import ANONYMOUS_TENANT, DEFAULT_TENANT, build_directory
from tests.unit.ingress_app import ingress_client

KEYS = ("sk-first-key", "sk-second-key")
DIRECTORY = build_directory(None, KEYS)


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
        assert identify(authorization, query, DIRECTORY).name == DEFAULT_TENANT
        return
    with pytest.raises(Unauthorized) as refused:
        identify(authorization, query, DIRECTORY)
    assert refusal in refused.value.message
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
    assert "sk-" not in refused.value.message


def test_without_keys_everything_passes_as_the_anonymous_tenant():
    assert identify(None, b"", build_directory(None, ())).name == ANONYMOUS_TENANT


def test_keys_come_from_the_config_and_the_environment():
    environment = {API_KEYS_ENV: " sk-env-1, ,sk-env-2,sk-config "}
    assert api_keys(["sk-config", " "], environment) == ("sk-config", "sk-env-1", "sk-env-2")
    assert api_keys([], {}) == ()


def test_config_keys_are_secret_in_its_repr():
    config = AppConfig.model_validate({"auth": {"api_keys": ["sk-very-secret"]}})
    assert "sk-very-secret" not in repr(config) and "sk-very-secret" not in str(config.model_dump())
    assert config.auth.api_keys[0].get_secret_value() == "sk-very-secret"


class RecordedTenants:
    directory = DIRECTORY

    def __init__(self):
        self.answers: list[tuple[str | None, int]] = []

    def ended(self, scope, status):
        tenant = tenant_of(scope)
        self.answers.append((tenant.name if tenant else None, status))


@pytest.fixture
def tenants(monkeypatch):
    recorded = RecordedTenants()
    monkeypatch.setattr(TenantMiddleware, "tenants", recorded)
    return recorded


@pytest.fixture
def client(tenants):
    async def ok(request):
        tenant = tenant_of(request.scope)
        return PlainTextResponse(f"ok {tenant.name}" if tenant else "ok")

    app = Starlette(routes=[Route("/health", ok), Route("/v1/models", ok)])
    app.add_middleware(TenantMiddleware)
    return TestClient(app)


def test_the_refusal_is_an_openai_error_and_health_stays_open(client, tenants):
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
    assert client.get("/v1/models", headers={"Authorization": "Bearer sk-second-key"}).text == "ok default"
    wrong = client.get("/v1/models", headers={"Authorization": "Bearer sk-guess"})
    assert wrong.status_code == 401 and "sk-guess" not in wrong.text
    # Every answer but /health's reaches the tenancy's accounting, a refused key's without a tenant.
    assert tenants.answers == [(None, 401), ("default", 200), (None, 401)]


def concrete(path: str) -> str:
    """A path a route template matches: /v1/{operation:path} -> /v1/embeddings."""
    return re.sub(r"\{[^}]*\}", "embeddings", path)


def test_every_route_of_the_ingress_but_health_wants_a_key(monkeypatch):
    """The real ingress app (serve.ingress), its middleware as the replica runs it."""
    routes = [
        (method, concrete(route.path))
        for route in ingress.app.routes
        for method in sorted(getattr(route, "methods", None) or ["GET"])
        if route.path != "/health"
    ]
    # The API the README lists is among them, so none of it is left out of what is checked.
    paths = {path for _, path in routes}
    assert {"/v1/models", "/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"} <= paths
    with ingress_client(monkeypatch, keys=KEYS) as client:
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer sk-wrong-key"}):
                refused = client.request(method, path, headers=headers, json={})
                assert refused.status_code == 401, (method, path, headers, refused.text)
                assert refused.headers["www-authenticate"] == "Bearer"
                if method == "HEAD":
                    continue  # no body
                error = refused.json()["error"]
                assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
        # /health answers without a key (the stand-in replica's stages are all up)...
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        # ... and a right key reaches the routes: the 401s above are the key's, nothing else's.
        served = client.post("/v1/embeddings", headers={"Authorization": "Bearer sk-first-key"}, json={})
        assert served.status_code == 400 and served.json()["error"]["code"] == "unsupported_operation"


def test_health_stays_open_under_a_route_prefix(tenants):
    """Serve runs an application under its route prefix with the prefix as the root path."""

    async def ok(request):
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/health", ok), Route("/v1/models", ok)])
    app.add_middleware(TenantMiddleware)
    client = TestClient(app, root_path="/tenants")
    assert client.get("/tenants/health").status_code == 200
    assert client.get("/tenants/v1/models").status_code == 401
