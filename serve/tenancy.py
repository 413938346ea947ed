"""The ingress replica's side of tenancy: its tenants (re-read when the file changes), its
admission gate, the quota ledger it asks, and what it counts per tenant.

A generation request goes: tenant found by its key (serve.auth) -> its
priority and deadline read from the request -> the quota ledger asked, for a
limited tenant (once, with the tokens estimated) -> prompt built -> the
admission gate (serve.admission: priority, fair share by cost, deadline) ->
encoder and decoder -> when the response is over, `ended`: the gate's slot
freed, the ledger told what the request used (once, unawaited), the tenant's
metrics counted.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from pathlib import Path
from typing import Any

from ray.serve.handle import DeploymentHandle

from serve.admission import AdmissionGate, AdmissionRefused, CostWeights, request_cost
from serve.auth import add_response_headers, tenant_of
from serve.config import AppConfig
from serve.errors import APIError, BadRequest
from serve.metrics import (
    ADMISSION_WAITING,
    TENANT_COMPLETION_TOKENS,
    TENANT_ENCODER_SECONDS,
    TENANT_IMAGE_TOKENS,
    TENANT_PROMPT_TOKENS,
    TENANT_REJECTIONS,
    TENANT_REQUESTS,
    TENANT_REQUESTS_IN_FLIGHT,
    LiveGauge,
    keep_alive,
    ray_metric,
)
from serve.quotas import (
    QuotaAsk,
    QuotaDecision,
    RequestOutcome,
    TenantLimits,
    TenantUsage,
    rate_limit_headers,
    retry_after,
)
from serve.request_metrics import RequestUsage, usage_of
from serve.tenants import (
    PRIORITY_RANK,
    UNKNOWN_TENANT,
    TenantsFileWatcher,
    TenantSpec,
    build_directory,
)

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT_HEADER = "x-request-timeout"
# Tokens a prompt's text is assumed to take per character before it is tokenised (tekken
# averages about four characters a token on English); corrected when the request ends.
CHARS_PER_TOKEN = 4
# Tokens assumed per image before it is fetched: a 1024 x 1024 image at Ministral 3's patch 14
# and spatial merge 2 (37 x 37 tokens, rounded up).
IMAGE_TOKENS_ESTIMATE = 1400
# How much longer than its time limit the ledger keeps a request counted, should its
# ingress replica die before saying it ended.
LEDGER_GRACE_S = 30.0


class RateLimited(APIError):
    status_code = 429
    error_type = "requests"

    def __init__(self, message: str, error_type: str, headers: dict[str, str], code: str):
        super().__init__(message, code=code)
        self.error_type = error_type
        self._headers = headers

    @property
    def headers(self) -> dict[str, str]:
        return self._headers


def gate_slots(config: AppConfig, tenants_from_file: bool) -> int:
    """Requests past one ingress replica at once (0: no gate)."""
    if config.admission.max_in_flight is not None:
        return config.admission.max_in_flight
    if not tenants_from_file:
        return 0
    stages = config.deployments
    decoders = stages.decoder.num_replicas or stages.decoder.autoscaling.max_replicas
    ingresses = stages.ingress.num_replicas or stages.ingress.autoscaling.min_replicas
    return max(1, config.engine.max_num_seqs * decoders // ingresses)


class TenantMetrics:
    def __init__(self, model: str):
        self.model = model
        self._requests = ray_metric(TENANT_REQUESTS)
        self._prompt_tokens = ray_metric(TENANT_PROMPT_TOKENS)
        self._image_tokens = ray_metric(TENANT_IMAGE_TOKENS)
        self._completion_tokens = ray_metric(TENANT_COMPLETION_TOKENS)
        self._encoder_seconds = ray_metric(TENANT_ENCODER_SECONDS)
        self._rejections = ray_metric(TENANT_REJECTIONS)
        self._in_flight_gauge = ray_metric(TENANT_REQUESTS_IN_FLIGHT)
        self.in_flight: dict[str, int] = {}
        keep_alive(self._set_in_flight)

    def _tags(self, tenant: str) -> dict[str, str]:
        return {"model": self.model, "tenant": tenant}

    def _set_in_flight(self) -> None:
        for tenant, count in list(self.in_flight.items()):
            self._in_flight_gauge.set(count, tags=self._tags(tenant))

    def started(self, tenant: str) -> None:
        self.in_flight[tenant] = self.in_flight.get(tenant, 0) + 1
        self._set_in_flight()

    def answered(self, tenant: str, status: int, error_code: str, usage: RequestUsage | None) -> None:
        tags = self._tags(tenant)
        self._requests.inc(1, tags={**tags, "status": str(status), "error_code": error_code})
        if usage is None:
            return
        self.in_flight[tenant] = max(0, self.in_flight.get(tenant, 0) - 1)
        self._set_in_flight()
        if usage.reached_decoder:
            for counter, value in (
                (self._prompt_tokens, usage.prompt_tokens),
                (self._image_tokens, usage.image_tokens),
                (self._completion_tokens, usage.completion_tokens),
                (self._encoder_seconds, usage.encoder_seconds),
            ):
                # Ray's counters refuse an increment of 0.
                if value > 0:
                    counter.inc(value, tags=tags)
        if usage.refused_for is not None:
            self._rejections.inc(1, tags={**tags, "reason": usage.refused_for})


class Tenancy:
    """One ingress replica's tenants, gate and ledger."""

    def __init__(
        self,
        config: AppConfig,
        plain_keys: tuple[str, ...],
        tenants_file: Path | None,
        ledger: DeploymentHandle | None,
        model: str,
    ):
        self._config = config
        self._ledger = ledger
        self._watcher: TenantsFileWatcher | None = None
        if tenants_file is not None:
            self._watcher = TenantsFileWatcher(tenants_file, plain_keys)
            self.directory = self._watcher.directory
            threading.Thread(target=self._watch, name="tenants-file", daemon=True).start()
        else:
            self.directory = build_directory(None, plain_keys)
        if tenants_file is not None and ledger is None:
            raise ValueError(
                f"the tenants file {tenants_file} was named where the replica runs but not where the "
                "application was built: name it in auth.tenants_file, so that the application gets "
                "its quota ledger"
            )
        slots = gate_slots(config, tenants_file is not None)
        reserved = config.admission.reserved_for_high
        self.gate = AdmissionGate(
            slots=slots or math.inf,
            max_waiting=config.admission.max_waiting,
            clock=time.monotonic,
            reserved_for_high=(slots // 8 if reserved is None else min(reserved, slots - 1)) if slots else 0,
        )
        self._weights = CostWeights(config.admission.prompt_token_cost, config.admission.image_token_cost)
        self.metrics = TenantMetrics(model)
        self._waiting_gauge = LiveGauge(ADMISSION_WAITING, read=lambda: self.gate.waiting)
        logger.info(
            "tenants: %d (%s); admission gate: %s",
            len(self.directory.tenants),
            "from " + str(tenants_file) if tenants_file else "no tenants file",
            f"{slots} requests at once" if slots else "none",
        )

    def _watch(self) -> None:
        while True:
            time.sleep(self._config.auth.tenants_reload_s)
            if self._watcher.refresh():
                self.directory = self._watcher.directory

    def started(self, scope: dict[str, Any], request_id: str) -> RequestUsage:
        usage = RequestUsage(request_id=request_id)
        scope.setdefault("state", {})["usage"] = usage
        self.metrics.started(tenant_of(scope).name)
        return usage

    @staticmethod
    def priority(tenant: TenantSpec, requested: str | None) -> int:
        """The rank a request runs at: its own `priority`, at most its tenant's."""
        ceiling = PRIORITY_RANK[tenant.priority]
        if requested is None:
            return ceiling
        if PRIORITY_RANK[requested] < ceiling:
            raise BadRequest(
                f"priority: {requested!r} is above this key's highest priority, {tenant.priority!r}",
                param="priority",
                code="priority_not_allowed",
            )
        return PRIORITY_RANK[requested]

    @staticmethod
    def deadline_s(headers: Any, in_body: float | None) -> float | None:
        """How long the client will wait: X-Request-Timeout (seconds), else `request_timeout`."""
        header = headers.get(REQUEST_TIMEOUT_HEADER)
        if header is None:
            return in_body
        try:
            seconds = float(header)
        except ValueError:
            seconds = math.nan
        if not math.isfinite(seconds) or seconds <= 0:
            raise BadRequest(
                "X-Request-Timeout: must be a positive number of seconds", param="X-Request-Timeout"
            )
        return seconds

    def estimated_tokens(self, text_chars: int, images: int, prompt_ids: int, completion: int | None) -> int:
        """A request's tokens before its prompt is built: charged to its tokens-per-minute quota
        at admission, corrected when it ends."""
        prompt = prompt_ids or math.ceil(text_chars / CHARS_PER_TOKEN)
        expected = completion or self._config.admission.expected_completion_tokens
        return prompt + images * IMAGE_TOKENS_ESTIMATE + expected

    async def admit_quota(self, scope: dict[str, Any], estimated_tokens: int) -> None:
        """Ask the ledger for a limited tenant; raise RateLimited when over a quota."""
        tenant, usage = tenant_of(scope), usage_of(scope)
        if not tenant.limited or self._ledger is None:
            return
        ask = QuotaAsk(
            tenant=tenant.name,
            limits=TenantLimits(
                tenant.requests_per_minute, tenant.tokens_per_minute, tenant.max_concurrent_requests
            ),
            estimated_tokens=estimated_tokens,
            request_id=usage.request_id,
            expires_in_s=self._config.limits.request_timeout_s + LEDGER_GRACE_S,
        )
        try:
            decision: QuotaDecision = await self._ledger.admit.remote(ask)
        except Exception as e:
            # Refusing every limited tenant while the ledger restarts would be an outage.
            logger.warning("quota ledger unreachable, admitting without it: %s", e)
            return
        if decision.admitted:
            add_response_headers(scope, rate_limit_headers(decision))
            return
        usage.refused_for = decision.reason
        window = decision.requests if decision.reason == "requests_per_minute" else decision.tokens
        what = {
            "requests_per_minute": "requests per minute",
            "tokens_per_minute": "tokens per minute",
            "max_concurrent_requests": "requests at once",
        }[decision.reason]
        limit = window.limit if window is not None else tenant.max_concurrent_requests
        raise RateLimited(
            f"rate limit reached for tenant {tenant.name} on {what}: limit {limit}; "
            f"try again in {math.ceil(decision.retry_after_s)} s",
            error_type="tokens" if decision.reason == "tokens_per_minute" else "requests",
            headers=rate_limit_headers(decision),
            code="rate_limit_exceeded",
        )

    async def admit(
        self,
        scope: dict[str, Any],
        rank: int,
        text_tokens: int,
        image_tokens: int,
        completion_tokens: int,
        choices: int,
        deadline_s: float | None,
        timeout_s: float,
    ) -> None:
        """Wait at the gate for a slot; raise RateLimited when the gate refuses the request.
        `completion_tokens`: per choice, as many as the request may generate."""
        tenant, usage = tenant_of(scope), usage_of(scope)
        usage.prompt_tokens, usage.image_tokens = text_tokens, image_tokens
        cost = request_cost(text_tokens, image_tokens, completion_tokens * choices, self._weights)
        try:
            usage.ticket = await self.gate.admit(
                tenant.name, tenant.weight, rank, cost, completion_tokens, deadline_s, timeout_s
            )
        except AdmissionRefused as refused:
            usage.refused_for = refused.reason
            raise RateLimited(
                str(refused),
                error_type="requests",
                headers=retry_after(refused.retry_after_s),
                code=refused.reason,
            ) from None
        except TimeoutError:
            usage.refused_for = "timeout"
            raise RateLimited(
                "the request waited for admission past its time limit (limits.request_timeout_s)",
                error_type="requests",
                headers=retry_after(1),
                code="timeout",
            ) from None
        usage.admitted_at = time.perf_counter()

    def ended(self, scope: dict[str, Any], status: int) -> None:
        """The response is over: free the slot, tell the ledger, count."""
        tenant, usage = tenant_of(scope), usage_of(scope)
        error_code = scope.get("state", {}).get("error_code", "")
        self.metrics.answered(tenant.name if tenant else UNKNOWN_TENANT, status, error_code, usage)
        if usage is None:
            return
        if usage.ticket is not None:
            usage.ticket.release(*self._latencies(usage), now=time.monotonic())
        if self._ledger is not None and self.directory.from_file:
            self._ledger.settle.remote(
                RequestOutcome(
                    tenant=tenant.name,
                    request_id=usage.request_id,
                    status=status,
                    prompt_tokens=usage.prompt_tokens if usage.reached_decoder else 0,
                    completion_tokens=usage.completion_tokens,
                    image_tokens=usage.image_tokens if usage.reached_decoder else 0,
                    encoder_seconds=usage.encoder_seconds,
                    refused_for=usage.refused_for,
                )
            )

    @staticmethod
    def _latencies(usage: RequestUsage) -> tuple[float | None, float | None]:
        if usage.first_token_at is None or usage.admitted_at is None:
            return None, None
        per_token = None
        if usage.longest_choice_tokens > 1:
            per_token = (usage.last_token_at - usage.first_token_at) / (usage.longest_choice_tokens - 1)
        return usage.first_token_at - usage.admitted_at, per_token

    async def usage(self, tenant: TenantSpec) -> TenantUsage:
        if self._ledger is None:
            raise BadRequest(
                "usage is counted per tenant of a tenants file (auth.tenants_file); this service has none",
                code="usage_not_tracked",
            )
        return await self._ledger.usage.remote(tenant.name)
