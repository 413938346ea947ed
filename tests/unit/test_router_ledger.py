"""The routers' count of what each replica holds of their requests (deployments/routing.py
`InFlightLedger`), driven as Serve drives the routers: ranked, routed, completed."""

from __future__ import annotations

from deployments.routing import InFlight, InFlightLedger

GENERATION = InFlight(requests=1, work=256, prefill_tokens=1000)
IMAGES = InFlight(requests=1, work=3)
KEYS = ("block-0", "block-1")
NOW = 1000.0


def held(ledger: InFlightLedger) -> dict[str, InFlight]:
    """What each replica holds, replicas that hold nothing left out."""
    return {replica_id: work for replica_id, work in ledger.held.items() if work != InFlight()}


def test_a_request_ranked_routed_and_completed_leaves_nothing_in_flight():
    ledger = InFlightLedger()
    ledger.ranked("r1", "a", GENERATION, KEYS, NOW)
    assert held(ledger) == {"a": GENERATION}
    assert ledger.routed("r1", "a", GENERATION) == KEYS
    assert held(ledger) == {"a": GENERATION}
    ledger.completed("r1")
    assert held(ledger) == {}


def test_a_request_routed_past_its_first_ranked_replica_counts_where_it_went():
    # Serve skips a replica at max_ongoing_requests and takes the next rank.
    ledger = InFlightLedger()
    ledger.ranked("r1", "a", GENERATION, KEYS, NOW)
    ledger.routed("r1", "b", GENERATION)
    assert held(ledger) == {"b": GENERATION}
    ledger.completed("r1")
    assert held(ledger) == {}


def test_requests_ranked_at_the_same_instant_see_each_other():
    ledger = InFlightLedger()
    ledger.ranked("r1", "a", GENERATION, KEYS, NOW)
    ledger.ranked("r2", "a", IMAGES, (), NOW)
    assert held(ledger) == {"a": InFlight(requests=2, work=259, prefill_tokens=1000)}


def test_a_request_ranked_again_counts_only_where_it_was_ranked_last():
    ledger = InFlightLedger()
    ledger.ranked("r1", "a", GENERATION, KEYS, NOW)
    ledger.ranked("r1", "b", GENERATION, KEYS, NOW + 0.1)
    assert held(ledger) == {"b": GENERATION}
    ledger.ranked("r1", None, GENERATION, KEYS, NOW + 0.2)  # no candidate left
    assert held(ledger) == {}


def test_a_request_ranked_and_never_routed_stops_counting_after_tentative_s():
    ledger = InFlightLedger(tentative_s=60.0)
    ledger.ranked("r1", "a", GENERATION, KEYS, NOW)
    ledger.ranked("r2", "b", IMAGES, (), NOW + 60.0)
    assert held(ledger) == {"a": GENERATION, "b": IMAGES}
    ledger.ranked("r3", "b", IMAGES, (), NOW + 60.5)
    assert held(ledger) == {"b": InFlight(requests=2, work=6)}
    # Its ranking gone, a late routing counts it without the ranking's keys.
    assert ledger.routed("r1", "a", GENERATION) is None


def test_a_request_routed_without_a_ranking_counts_until_it_completes():
    ledger = InFlightLedger()
    assert ledger.routed("r1", "a", IMAGES) is None
    assert held(ledger) == {"a": IMAGES}
    ledger.completed("r1")
    ledger.completed("r1")  # Serve reports each completion once; a second is not counted twice
    ledger.completed("engine-info")  # a call that was never counted
    assert held(ledger) == {}
    assert all(work.requests >= 0 and work.work >= 0 for work in ledger.held.values())


def test_a_replica_that_vanishes_is_forgotten_with_its_entries():
    ledger = InFlightLedger()
    ledger.ranked("r1", "a", GENERATION, KEYS, NOW)
    ledger.routed("r1", "a", GENERATION)
    ledger.ranked("r2", "a", IMAGES, (), NOW)
    ledger.ranked("r3", "b", IMAGES, (), NOW)
    ledger.forget({"a"})
    assert "a" not in ledger.held
    assert held(ledger) == {"b": IMAGES}
    # What it held finishing, or being routed elsewhere, does not bring it back.
    ledger.completed("r1")
    assert ledger.routed("r2", "b", IMAGES) is None
    assert "a" not in ledger.held
    assert held(ledger) == {"b": InFlight(requests=2, work=6)}


def test_completing_one_of_two_requests_leaves_the_other_counted():
    ledger = InFlightLedger()
    ledger.routed("r1", "a", IMAGES)
    ledger.routed("r2", "a", IMAGES)
    ledger.completed("r1")
    assert held(ledger) == {"a": IMAGES}


def test_a_request_ranked_elsewhere_leaves_the_others_on_its_first_replica():
    ledger = InFlightLedger()
    ledger.ranked("r1", "a", IMAGES, (), NOW)
    ledger.ranked("r2", "a", IMAGES, (), NOW)
    ledger.ranked("r2", "b", IMAGES, (), NOW + 0.1)
    assert held(ledger) == {"a": IMAGES, "b": IMAGES}


def test_forgetting_a_replica_it_never_counted_is_harmless():
    ledger = InFlightLedger()
    ledger.routed("r1", "a", IMAGES)
    ledger.forget({"never-seen"})
    assert held(ledger) == {"a": IMAGES}
