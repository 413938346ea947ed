"""What the ingress measures about each request, as the client sees it.

`RequestMetricsMiddleware` (plain ASGI, so that streams and client
disconnects pass through untouched) counts every HTTP request by route,
status and error code, times it to its last byte and keeps the number in
flight. `RequestMetrics.decoded` wraps the decoder's chunk stream of a
generation request: time to first token from the request's arrival, time
per output token, prompt and generated tokens. Names, units and labels are
serve/metrics.py's.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse

from serve.admission import AdmissionTicket
from serve.errors import APIError
from serve.messages import DecodeChunk
from serve.metrics import (
    GENERATION_TOKENS,
    IMAGE_REQUESTS,
    PROMPT_TOKENS,
    REQUEST_DURATION,
    REQUESTS,
    REQUESTS_IN_FLIGHT,
    TIME_PER_OUTPUT_TOKEN,
    TIME_TO_FIRST_TOKEN,
    LiveGauge,
    ray_metric,
)
from serve.protocol.common import error_payload

# Paths no route matched (404s) share one label value: a label per path
# would let any client grow the series without bound.
UNMATCHED_ROUTE = "unmatched"


def route_of(scope: dict[str, Any]) -> str:
    route = scope.get("route")
    return getattr(route, "path", UNMATCHED_ROUTE)


@dataclass
class RequestUsage:
    """What one generation request used, filled in as it runs (kept in the ASGI scope)."""

    request_id: str
    prompt_tokens: int = 0  # text tokens of the prompt
    image_tokens: int = 0
    completion_tokens: int = 0
    encoder_seconds: float = 0.0
    reached_decoder: bool = False
    admitted_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    longest_choice_tokens: int = 0
    refused_for: str | None = None
    ticket: AdmissionTicket | None = None


def usage_of(scope: dict[str, Any]) -> RequestUsage | None:
    return scope.get("state", {}).get("usage")


def received_at(scope: dict[str, Any]) -> float:
    """When the middleware saw the request (now, outside the middleware)."""
    return scope.get("state", {}).get("received_at", time.perf_counter())


def mark_error(scope: dict[str, Any], code: str) -> None:
    """The OpenAI error code the request's count carries."""
    scope.setdefault("state", {})["error_code"] = code


def error_code(error: APIError) -> str:
    """The error's label in the request metrics: its OpenAI code, else its type."""
    return str(error.code or error.error_type)


def error_response(scope: dict[str, Any], error: APIError) -> JSONResponse:
    """The OpenAI-shaped answer to `error` (with its headers), its code marked for the request's count."""
    mark_error(scope, error_code(error))
    return JSONResponse(
        error_payload(error.message, error.error_type, error.param, error.code),
        status_code=error.status_code,
        headers=error.headers,
    )


class RequestMetrics:
    """One ingress replica's request metrics; created in the replica."""

    def __init__(self, model: str):
        self.model = model
        self.in_flight = 0
        self._requests = ray_metric(REQUESTS)
        self._duration = ray_metric(REQUEST_DURATION)
        self._ttft = ray_metric(TIME_TO_FIRST_TOKEN)
        self._tpot = ray_metric(TIME_PER_OUTPUT_TOKEN)
        self._prompt_tokens = ray_metric(PROMPT_TOKENS)
        self._generation_tokens = ray_metric(GENERATION_TOKENS)
        self._image_requests = ray_metric(IMAGE_REQUESTS)
        self._in_flight_gauge = LiveGauge(REQUESTS_IN_FLIGHT, read=lambda: self.in_flight)

    def answered(self, route: str, status: int, error_code: str, stream: bool, seconds: float) -> None:
        self._requests.inc(
            1, tags={"model": self.model, "route": route, "status": str(status), "error_code": error_code}
        )
        self._duration.observe(
            seconds, tags={"model": self.model, "route": route, "stream": "true" if stream else "false"}
        )

    def image_request(self) -> None:
        self._image_requests.inc(1, tags={"model": self.model})

    async def decoded(
        self, chunks: AsyncIterator[DecodeChunk], scope: dict[str, Any], prompt_tokens: int
    ) -> AsyncIterator[DecodeChunk]:
        tags = {"model": self.model, "route": route_of(scope)}
        started = received_at(scope)
        usage = usage_of(scope)
        first_token_at = last_token_at = None
        prompt_counted = False
        tokens_per_choice: dict[int, int] = {}
        try:
            async for chunk in chunks:
                if not prompt_counted:
                    # Counted once the engine has taken the prompt: a request
                    # refused or retried before that did not cost its prefill.
                    self._prompt_tokens.inc(prompt_tokens, tags=tags)
                    prompt_counted = True
                    if usage is not None:
                        usage.reached_decoder = True
                        usage.encoder_seconds = chunk.encoder_seconds
                generated = 0
                for choice in chunk.choices:
                    generated += len(choice.token_ids)
                    tokens_per_choice[choice.index] = tokens_per_choice.get(choice.index, 0) + len(
                        choice.token_ids
                    )
                if generated:
                    last_token_at = time.perf_counter()
                    if first_token_at is None:
                        first_token_at = last_token_at
                        self._ttft.observe(first_token_at - started, tags=tags)
                    # Counted as they stream, so that the token rate of a long
                    # stream shows while it runs.
                    self._generation_tokens.inc(generated, tags=tags)
                    if usage is not None:
                        usage.completion_tokens += generated
                        usage.first_token_at, usage.last_token_at = first_token_at, last_token_at
                        usage.longest_choice_tokens = max(tokens_per_choice.values())
                yield chunk
        finally:
            longest = max(tokens_per_choice.values(), default=0)
            if first_token_at is not None and longest > 1:
                self._tpot.observe((last_token_at - first_token_at) / (longest - 1), tags=tags)


class RequestMetricsMiddleware:
    """Counts and times every HTTP request of the ingress app.

    `metrics` is set by the ingress replica once it has created its
    metrics; until then requests pass through uncounted.
    """

    metrics: RequestMetrics | None = None

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        metrics = type(self).metrics
        if scope["type"] != "http" or metrics is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        state["received_at"] = started
        response: dict[str, Any] = {"status": 500, "stream": False}

        async def send_observed(message):
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
                headers = dict(message.get("headers") or [])
                response["stream"] = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            await send(message)

        metrics.in_flight += 1
        try:
            await self.app(scope, receive, send_observed)
        finally:
            metrics.in_flight -= 1
            metrics.answered(
                route_of(scope),
                response["status"],
                state.get("error_code", ""),
                response["stream"],
                time.perf_counter() - started,
            )
