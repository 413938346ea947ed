"""API keys, OpenAI style: `Authorization: Bearer KEY` on every route but /health.

Keys come from the config (`auth.api_keys`) and from MINISTRAL_API_KEYS
(comma-separated) in the replica's environment; with neither, the service is
open (the local demo). A presented key is compared with every configured key
in constant time, and no key, presented or configured, is ever echoed into
a response or a log line.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable, Mapping
from urllib.parse import parse_qsl

from serve.errors import APIError
from serve.request_metrics import error_response

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


def api_keys(configured: Iterable[str], environ: Mapping[str, str] = os.environ) -> tuple[bytes, ...]:
    """Every accepted key: the config's and the environment's, blanks dropped."""
    from_environment = environ.get(API_KEYS_ENV, "").split(",")
    keys = {key.strip() for key in (*configured, *from_environment)}
    return tuple(sorted(key.encode() for key in keys if key))


def check_api_key(authorization: str | None, query_string: bytes, keys: tuple[bytes, ...]) -> None:
    """Raise Unauthorized unless `authorization` carries one of `keys` (no keys: everything passes)."""
    if not keys:
        return
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
    candidate = presented.strip().encode()
    # Every key is compared, matched or not, so the time taken says nothing about which.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(candidate, key)
    if not matched:
        raise Unauthorized("the API key is not valid", code="invalid_api_key")


class ApiKeyMiddleware:
    """Checks every request but OPEN_PATHS against `keys`, which the ingress replica sets at start."""

    keys: tuple[bytes, ...] = ()

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        authorization = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        try:
            check_api_key(authorization, scope.get("query_string", b""), self.keys)
        except Unauthorized as refused:
            response = error_response(scope, refused)
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)
