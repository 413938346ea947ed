"""QuotaLedger: the application's one record of every tenant's quota use (serve/quotas.py).

One replica, no CPUs reserved. Each ingress replica calls `admit` once when a
request of a limited tenant arrives, and `settle` once when any request of a
tenant from the tenants file ends (without waiting for the answer). A lost
ledger is restarted by Serve empty: for up to a minute, tenants may use up to
twice their per-minute quota; the ingress admits requests while the ledger
cannot be reached rather than refusing every limited tenant.
"""

from __future__ import annotations

import time

from ray import serve

from serve.quotas import QuotaAsk, QuotaDecision, QuotaLedgerState, RequestOutcome, TenantUsage


@serve.deployment(name="QuotaLedger", num_replicas=1, ray_actor_options={"num_cpus": 0})
class QuotaLedger:
    def __init__(self) -> None:
        self._state = QuotaLedgerState()

    def admit(self, ask: QuotaAsk) -> QuotaDecision:
        return self._state.admit(ask, time.monotonic())

    def settle(self, outcome: RequestOutcome) -> None:
        self._state.settle(outcome, time.monotonic())

    def usage(self, tenant: str) -> TenantUsage:
        return self._state.usage(tenant)
