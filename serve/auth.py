"""API keys, OpenAI style: `Authorization: Bearer KEY` on every route but /health; each key
belongs to a tenant (serve/tenants.py).

Keys come from the tenants file, from the config (`auth.api_keys`) and from
MINISTRAL_API_KEYS (comma-separated) in the replica's environment; with none,
the service is open (the local demo) and every request is the anonymous
tenant's. A presented key is hashed and looked up by its SHA-256 digest, and
no key, presented or configured, is ever echoed into a response, a log line
or a metric label.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any, Protocol
from urllib.parse import parse_qsl

from serve.errors import APIError
from serve.request_metrics import error_response
from serve.tenants import ANONYMOUS, TenantDirectory, TenantSpec

API_KEYS_ENV = "MINISTRAL_API_KEYS"
# Load balancers and Kubernetes probe these without credentials.
OPEN_PATHS = frozenset({"/health"})
# Where clients misplace keys; refused with a message that says where they go.
QUERY_KEY_NAMES = frozenset({"api_key", "api-key", "apikey", "key", "token", "access_token"})


class Unauthorized(APIError):
    status_code = 401
    error_type = "invalid_request_error"

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


def api_keys(configured: Iterable[str], environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """Every plain key: the config's and the environment's, blanks dropped."""
    from_environment = environ.get(API_KEYS_ENV, "").split(",")
    keys = {key.strip() for key in (*configured, *from_environment)}
    return tuple(sorted(key for key in keys if key))


def identify(authorization: str | None, query_string: bytes, directory: TenantDirectory) -> TenantSpec:
    """The tenant whose key `authorization` carries; Unauthorized when it carries none of them
    (an open service: everyone is the anonymous tenant)."""
    if directory.open:
        return ANONYMOUS
    scheme, _, presented = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        query_names = {name.lower() for name, _ in parse_qsl(query_string.decode("latin-1"))}
        where = (
            "API keys are not accepted in the URL; "
            if query_names & QUERY_KEY_NAMES
            else "no API key was sent; "
        )
        raise Unauthorized(
            where + "send one in an Authorization header: `Authorization: Bearer YOUR_KEY`",
            code="invalid_api_key",
        )
    tenant = directory.find(presented.strip())
    if tenant is None:
        raise Unauthorized("the API key is not valid", code="invalid_api_key")
    return tenant


def tenant_of(scope: dict[str, Any]) -> TenantSpec | None:
    """The tenant the middleware found for the request (None: refused, or an open path)."""
    return scope.get("state", {}).get("tenant")


def add_response_headers(scope: dict[str, Any], headers: Mapping[str, str]) -> None:
    """Headers the middleware adds to the response, whichever route or error handler answers."""
    scope.setdefault("state", {}).setdefault("response_headers", {}).update(headers)


def _app_path(scope: dict[str, Any]) -> str:
    """The path within the application: under a route prefix (`/tenants/health`), Serve gives
    the prefix as the root path and leaves it in the path."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class Tenants(Protocol):
    """What the middleware needs of the replica's tenancy (serve.tenancy.Tenancy)."""

    directory: TenantDirectory

    def ended(self, scope: dict[str, Any], status: int) -> None: ...


class TenantMiddleware:
    """Finds every request's tenant but OPEN_PATHS' (from `tenants.directory`, which the
    ingress replica replaces when the tenants file changes), adds the response headers the
    request's handling asked for, and tells `tenants` when the response is over. Until the
    replica sets `tenants`, everyone is the anonymous tenant."""

    tenants: Tenants | None = None

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or _app_path(scope) in OPEN_PATHS:
            return await self.app(scope, receive, send)
        authorization = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        state = scope.setdefault("state", {})
        tenants = type(self).tenants
        directory = tenants.directory if tenants is not None else TenantDirectory(by_digest={})
        status = 500

        async def send_with_headers(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                added = state.get("response_headers")
                if added:
                    message = {
                        **message,
                        "headers": [
                            *message.get("headers", []),
                            *((name.lower().encode(), value.encode()) for name, value in added.items()),
                        ],
                    }
            await send(message)

        try:
            try:
                state["tenant"] = identify(authorization, scope.get("query_string", b""), directory)
            except Unauthorized as refused:
                return await error_response(scope, refused)(scope, receive, send_with_headers)
            await self.app(scope, receive, send_with_headers)
        finally:
            if tenants is not None:
                tenants.ended(scope, status)
