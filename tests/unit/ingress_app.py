"""The ingress's real HTTP app (serve.ingress.app: its middleware, routes and error handlers) in a
TestClient, without Ray: each route's `self` is a stand-in replica, an `Ingress` made without its
__init__ (which opens the checkpoint and needs Serve) and given only what the routes read before
they call a stage. Requests that need a stage (the decoder, the preprocess) do not belong here."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from starlette.testclient import TestClient

from serve.auth import TenantMiddleware
from serve.config import AppConfig
from serve.ingress import Ingress, app
from serve.messages import EngineInfo
from serve.request_metrics import RequestMetricsMiddleware
from serve.tenancy import Tenancy

MODEL = "m"
INFO = EngineInfo(max_model_len=4096, vocab_size=131072, system_fingerprint="fp_test")


def stand_in_replica(config: AppConfig | None = None, info: EngineInfo = INFO) -> Ingress:
    """An ingress replica serving MODEL whose stages all look healthy."""
    # The class as serve/ingress.py writes it, under Serve's ASGI wrapper (whose __del__ would
    # want a running replica).
    written = next(cls for cls in Ingress.func_or_class.__mro__[1:] if cls.__qualname__ == "Ingress")
    replica = object.__new__(written)
    replica._config = config or AppConfig()
    replica._model_name = MODEL
    replica._created = 0
    replica._engine_info = info
    replica._engine_info_asked = asyncio.Lock()
    replica._stage_states_asked = asyncio.Lock()
    replica._stage_states_seen = {"decoder": "ok"}
    # Never stale: /health does not ask Serve.
    replica._stage_states_at = math.inf
    return replica


def _servable_dependencies() -> set:
    """What each route calls for its `self` (Serve's replica context, in a replica)."""
    return {
        dependency.call
        for route in app.routes
        for dependency in getattr(getattr(route, "dependant", None), "dependencies", ())
        if dependency.name == "self"
    }


@contextmanager
def ingress_client(
    monkeypatch: pytest.MonkeyPatch, keys: tuple[str, ...] = (), replica: Ingress | None = None
) -> Iterator[TestClient]:
    """A client of the real ingress app, with these API keys required (none: open)."""
    monkeypatch.setattr(RequestMetricsMiddleware, "metrics", None)
    replica = replica or stand_in_replica()
    replica._tenancy = Tenancy(replica._config, keys, None, None, MODEL)
    monkeypatch.setattr(TenantMiddleware, "tenants", replica._tenancy)
    dependencies = _servable_dependencies()
    assert dependencies, "the ingress's routes no longer take their replica as a dependency"
    for call in dependencies:
        monkeypatch.setitem(app.dependency_overrides, call, lambda: replica)
    yield TestClient(app)
