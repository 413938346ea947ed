"""Per-tenant quotas, the same for the whole application: requests and tokens per minute, and
requests at once.

Pure state with an injected clock; the `QuotaLedger` deployment
(deployments/quota_ledger.py) holds one for the application, and every
ingress replica asks it once when a request of a limited tenant arrives and
tells it once when the request ends. Nothing is asked per token.

A minute is a sliding window: a tenant at 30 requests/minute has at most 30
requests admitted in any 60 seconds, whatever their pattern. A request is
charged its estimated tokens (prompt, images and the completion it may
generate) when admitted, and its real tokens when it ends. Over a limit, the
refusal says when the window will have room for the request (Retry-After),
from the admissions that will leave it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

WINDOW_S = 60.0
# A tenant at its concurrency limit waits for one of its own requests to end: when is unknown.
CONCURRENCY_RETRY_S = 1.0

RefusalReason = Literal["requests_per_minute", "tokens_per_minute", "max_concurrent_requests"]


@dataclass(frozen=True)
class TenantLimits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent_requests: int | None = None


@dataclass(frozen=True)
class QuotaAsk:
    """An ingress replica asking to admit one request of `tenant`."""

    tenant: str
    limits: TenantLimits
    estimated_tokens: int
    request_id: str
    # After this the ledger forgets the request, should its ingress replica never say it ended.
    expires_in_s: float


@dataclass(frozen=True)
class WindowState:
    limit: int
    remaining: int
    reset_s: float  # until the window is empty again


@dataclass(frozen=True)
class QuotaDecision:
    admitted: bool
    reason: RefusalReason | None = None
    retry_after_s: float = 0.0
    requests: WindowState | None = None
    tokens: WindowState | None = None


@dataclass(frozen=True)
class RequestOutcome:
    """What a request of `tenant` used, told to the ledger when it ends."""

    tenant: str
    request_id: str
    status: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    image_tokens: int = 0
    encoder_seconds: float = 0.0
    refused_for: str | None = None  # why the service refused it, if it did


@dataclass
class TenantUsage:
    """A tenant's numbers since the ledger started."""

    requests: dict[str, int] = field(default_factory=dict)  # by status code
    prompt_tokens: int = 0
    completion_tokens: int = 0
    image_tokens: int = 0
    encoder_seconds: float = 0.0
    refusals: dict[str, int] = field(default_factory=dict)  # by reason
    in_flight: int = 0


class _Charge:
    __slots__ = ("amount", "at")

    def __init__(self, at: float, amount: int):
        self.at = at
        self.amount = amount


class SlidingWindow:
    """At most `limit` units admitted in any WINDOW_S seconds."""

    def __init__(self, limit: int):
        self.limit = limit
        self._charges: deque[_Charge] = deque()
        self._used = 0

    def _expire(self, now: float) -> None:
        while self._charges and self._charges[0].at <= now - WINDOW_S:
            self._used -= self._charges.popleft().amount

    def used(self, now: float) -> int:
        self._expire(now)
        return self._used

    def wait_s(self, amount: int, now: float) -> float:
        """Seconds until `amount` more fits (0: it fits now)."""
        self._expire(now)
        excess = self._used + min(amount, self.limit) - self.limit
        for charge in self._charges:
            if excess <= 0:
                break
            excess -= charge.amount
            if excess <= 0:
                return charge.at + WINDOW_S - now
        return 0.0

    def charge(self, amount: int, now: float) -> _Charge:
        charge = _Charge(now, min(amount, self.limit))
        self._charges.append(charge)
        self._used += charge.amount
        return charge

    def correct(self, charge: _Charge, actual: int, now: float) -> None:
        """The request used `actual`: a charge still in the window is changed in place; one that
        has left it is charged the excess anew (a refund for it would be counted twice)."""
        self._expire(now)
        if charge.at > now - WINDOW_S:
            self._used += actual - charge.amount
            charge.amount = actual
        elif actual > charge.amount:
            self.charge(actual - charge.amount, now)

    def state(self, now: float) -> WindowState:
        used = self.used(now)
        reset_s = self._charges[-1].at + WINDOW_S - now if self._charges else 0.0
        return WindowState(limit=self.limit, remaining=max(0, self.limit - used), reset_s=reset_s)


@dataclass
class _TenantQuota:
    requests: SlidingWindow | None = None
    tokens: SlidingWindow | None = None
    # request id -> (its token charge, when the ledger forgets it)
    in_flight: dict[str, tuple[_Charge | None, float]] = field(default_factory=dict)


class QuotaLedgerState:
    """Every tenant's windows, concurrency and usage."""

    def __init__(self) -> None:
        self._quotas: dict[str, _TenantQuota] = {}
        self._usage: dict[str, TenantUsage] = {}

    def _quota(self, tenant: str, limits: TenantLimits) -> _TenantQuota:
        quota = self._quotas.setdefault(tenant, _TenantQuota())
        # Limits follow the tenants file: a changed limit applies to the window as it stands.
        quota.requests = _window(quota.requests, limits.requests_per_minute)
        quota.tokens = _window(quota.tokens, limits.tokens_per_minute)
        return quota

    def admit(self, ask: QuotaAsk, now: float) -> QuotaDecision:
        quota = self._quota(ask.tenant, ask.limits)
        self._forget_expired(quota, now)
        refusal: tuple[RefusalReason, float] | None = None
        if quota.requests is not None and (wait := quota.requests.wait_s(1, now)) > 0:
            refusal = ("requests_per_minute", wait)
        elif quota.tokens is not None and (wait := quota.tokens.wait_s(ask.estimated_tokens, now)) > 0:
            refusal = ("tokens_per_minute", wait)
        elif (
            ask.limits.max_concurrent_requests is not None
            and len(quota.in_flight) >= ask.limits.max_concurrent_requests
        ):
            refusal = ("max_concurrent_requests", CONCURRENCY_RETRY_S)
        if refusal is None:
            if quota.requests is not None:
                quota.requests.charge(1, now)
            token_charge = quota.tokens.charge(ask.estimated_tokens, now) if quota.tokens else None
            quota.in_flight[ask.request_id] = (token_charge, now + ask.expires_in_s)
            self.usage(ask.tenant).in_flight = len(quota.in_flight)
        else:
            refusals = self.usage(ask.tenant).refusals
            refusals[refusal[0]] = refusals.get(refusal[0], 0) + 1
        return QuotaDecision(
            admitted=refusal is None,
            reason=refusal[0] if refusal else None,
            retry_after_s=refusal[1] if refusal else 0.0,
            requests=quota.requests.state(now) if quota.requests else None,
            tokens=quota.tokens.state(now) if quota.tokens else None,
        )

    def settle(self, outcome: RequestOutcome, now: float) -> None:
        usage = self.usage(outcome.tenant)
        status = str(outcome.status)
        usage.requests[status] = usage.requests.get(status, 0) + 1
        usage.prompt_tokens += outcome.prompt_tokens
        usage.completion_tokens += outcome.completion_tokens
        usage.image_tokens += outcome.image_tokens
        usage.encoder_seconds += outcome.encoder_seconds
        # Quota refusals were counted when refused.
        if outcome.refused_for is not None and not outcome.refused_for.endswith(
            ("_per_minute", "max_concurrent_requests")
        ):
            usage.refusals[outcome.refused_for] = usage.refusals.get(outcome.refused_for, 0) + 1
        quota = self._quotas.get(outcome.tenant)
        if quota is None:
            return
        held = quota.in_flight.pop(outcome.request_id, None)
        if held is not None and held[0] is not None and quota.tokens is not None:
            used = outcome.prompt_tokens + outcome.completion_tokens + outcome.image_tokens
            quota.tokens.correct(held[0], used, now)
        usage.in_flight = len(quota.in_flight)

    def usage(self, tenant: str) -> TenantUsage:
        return self._usage.setdefault(tenant, TenantUsage())

    def all_usage(self) -> Mapping[str, TenantUsage]:
        return self._usage

    def _forget_expired(self, quota: _TenantQuota, now: float) -> None:
        for request_id in [rid for rid, (_, expires_at) in quota.in_flight.items() if expires_at <= now]:
            del quota.in_flight[request_id]


def _window(window: SlidingWindow | None, limit: int | None) -> SlidingWindow | None:
    if limit is None:
        return None
    if window is None:
        return SlidingWindow(limit)
    window.limit = limit
    return window


def openai_duration(seconds: float) -> str:
    """OpenAI's x-ratelimit-reset-* format: `20ms`, `1s`, `6m0s`, `1h2m3s`."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def retry_after(seconds: float) -> dict[str, str]:
    """The Retry-After header for a wait of `seconds`: whole seconds, at least one."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def rate_limit_headers(decision: QuotaDecision) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers, for the limits the tenant has; Retry-After when refused."""
    headers: dict[str, str] = {}
    for unit, window in (("requests", decision.requests), ("tokens", decision.tokens)):
        if window is not None:
            headers[f"x-ratelimit-limit-{unit}"] = str(window.limit)
            headers[f"x-ratelimit-remaining-{unit}"] = str(window.remaining)
            headers[f"x-ratelimit-reset-{unit}"] = openai_duration(window.reset_s)
    if not decision.admitted:
        headers.update(retry_after(decision.retry_after_s))
    return headers
