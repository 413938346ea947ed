"""Quotas per tenant (serve/quotas.py) on hand-built states and an injected clock."""

import pytest

from serve.quotas import (
    QuotaAsk,
    QuotaLedgerState,
    RequestOutcome,
    SlidingWindow,
    TenantLimits,
    openai_duration,
    rate_limit_headers,
)


def ask(request_id: str, tokens: int = 10, **limits) -> QuotaAsk:
    return QuotaAsk(
        tenant="acme",
        limits=TenantLimits(**limits),
        estimated_tokens=tokens,
        request_id=request_id,
        expires_in_s=600,
    )


def test_a_minute_is_a_sliding_window_whatever_the_pattern():
    ledger = QuotaLedgerState()
    # 60 requests over one minute, one a second, against 30 a minute: the first 30 pass,
    # then none until the first of them is a minute old.
    admitted = [ledger.admit(ask(f"r{t}", requests_per_minute=30), now=t).admitted for t in range(60)]
    assert admitted == [True] * 30 + [False] * 30
    assert ledger.admit(ask("r60", requests_per_minute=30), now=60).admitted
    # A burst gets no more than the limit either.
    burst = QuotaLedgerState()
    assert sum(burst.admit(ask(f"b{i}", requests_per_minute=30), now=0.0).admitted for i in range(60)) == 30


def test_the_refusal_says_when_the_window_has_room_again():
    ledger = QuotaLedgerState()
    for t in (0.0, 10.0, 20.0):
        assert ledger.admit(ask(f"r{t}", requests_per_minute=3), now=t).admitted
    refused = ledger.admit(ask("late", requests_per_minute=3), now=25.0)
    assert not refused.admitted and refused.reason == "requests_per_minute"
    # The admission at 0 leaves the window at 60.
    assert refused.retry_after_s == pytest.approx(35.0)
    assert refused.requests.remaining == 0
    # Honoured, the retry gets in; a moment earlier it does not.
    assert not ledger.admit(ask("early", requests_per_minute=3), now=59.9).admitted
    assert ledger.admit(ask("honoured", requests_per_minute=3), now=25.0 + refused.retry_after_s).admitted


def test_tokens_are_charged_as_estimated_and_corrected_when_the_request_ends():
    ledger = QuotaLedgerState()
    first = ledger.admit(ask("a", tokens=800, tokens_per_minute=1000), now=0.0)
    assert first.admitted and first.tokens.remaining == 200
    # Over what is left of the estimate: refused until the first request's charge leaves.
    refused = ledger.admit(ask("b", tokens=300, tokens_per_minute=1000), now=1.0)
    assert not refused.admitted and refused.reason == "tokens_per_minute"
    assert refused.retry_after_s == pytest.approx(59.0)
    # The first used 100 of its 800: the correction makes room at once.
    ledger.settle(
        RequestOutcome("acme", "a", 200, prompt_tokens=40, completion_tokens=50, image_tokens=10), 2.0
    )
    assert ledger.admit(ask("b", tokens=300, tokens_per_minute=1000), now=2.0).tokens.remaining == 600


def test_a_correction_after_the_charge_left_the_window_charges_only_the_excess():
    window = SlidingWindow(limit=1000)
    charge = window.charge(100, now=0.0)
    window.correct(charge, 400, now=70.0)  # a long request: its charge left the window at 60
    assert window.used(70.0) == 300
    refund = window.charge(500, now=80.0)
    window.correct(refund, 50, now=150.0)  # less than estimated, and gone: nothing to refund
    assert window.used(150.0) == 0


def test_an_estimate_over_the_whole_limit_waits_for_an_empty_window_instead_of_never_passing():
    ledger = QuotaLedgerState()
    assert ledger.admit(ask("huge", tokens=5000, tokens_per_minute=1000), now=0.0).admitted
    assert not ledger.admit(ask("next", tokens=1, tokens_per_minute=1000), now=1.0).admitted


def test_concurrency_counts_requests_until_they_end_or_their_ingress_is_presumed_dead():
    ledger = QuotaLedgerState()
    limits = {"max_concurrent_requests": 2}
    assert ledger.admit(ask("a", **limits), now=0.0).admitted
    assert ledger.admit(ask("b", **limits), now=0.0).admitted
    refused = ledger.admit(ask("c", **limits), now=0.0)
    assert not refused.admitted and refused.reason == "max_concurrent_requests"
    ledger.settle(RequestOutcome("acme", "a", 200), now=1.0)
    assert ledger.admit(ask("c", **limits), now=1.0).admitted
    assert ledger.usage("acme").in_flight == 2
    # Never told that b and c ended (their ingress replica died): forgotten once they expire.
    assert ledger.admit(ask("d", **limits), now=601.0).admitted


def test_usage_counts_outcomes_tokens_and_refusals_per_tenant():
    ledger = QuotaLedgerState()
    ledger.admit(ask("a", requests_per_minute=1), now=0.0)
    ledger.admit(ask("b", requests_per_minute=1), now=0.0)  # refused
    ledger.settle(RequestOutcome("acme", "a", 200, 10, 20, 30, 0.5), now=1.0)
    ledger.settle(RequestOutcome("acme", "b", 429, refused_for="requests_per_minute"), now=1.0)
    ledger.settle(RequestOutcome("acme", "c", 429, refused_for="deadline"), now=1.0)
    usage = ledger.usage("acme")
    assert usage.requests == {"200": 1, "429": 2}
    assert (usage.prompt_tokens, usage.completion_tokens, usage.image_tokens) == (10, 20, 30)
    assert usage.encoder_seconds == 0.5
    assert usage.refusals == {"requests_per_minute": 1, "deadline": 1}
    assert ledger.usage("other").requests == {}


def test_a_changed_limit_applies_to_the_window_as_it_stands():
    ledger = QuotaLedgerState()
    for i in range(5):
        ledger.admit(ask(f"r{i}", requests_per_minute=10), now=0.0)
    assert not ledger.admit(ask("x", requests_per_minute=5), now=1.0).admitted
    assert ledger.admit(ask("y", requests_per_minute=10), now=1.0).admitted


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.0204, "21ms"), (1.0, "1s"), (6.2, "7s"), (360, "6m0s"), (3723, "1h2m3s")]
)
def test_reset_times_are_written_as_openai_writes_them(seconds, text):
    assert openai_duration(seconds) == text


def test_headers_carry_both_windows_and_retry_after_only_when_refused():
    ledger = QuotaLedgerState()
    admitted = ledger.admit(ask("a", tokens=100, requests_per_minute=2, tokens_per_minute=1000), now=0.0)
    headers = rate_limit_headers(admitted)
    assert headers == {
        "x-ratelimit-limit-requests": "2",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "1m0s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "900",
        "x-ratelimit-reset-tokens": "1m0s",
    }
    ledger.admit(ask("b", tokens=100, requests_per_minute=2, tokens_per_minute=1000), now=30.5)
    refused = rate_limit_headers(
        ledger.admit(ask("c", tokens=100, requests_per_minute=2, tokens_per_minute=1000), now=40.0)
    )
    assert refused["Retry-After"] == "20" and refused["x-ratelimit-remaining-requests"] == "0"
    # Only the limits a tenant has are announced.
    assert set(rate_limit_headers(ledger.admit(ask("z", max_concurrent_requests=9), now=0.0))) == set()
