"""The routing policy (deployments/routing.py) on hand-built replica states, without Ray."""

from __future__ import annotations

import statistics

import pytest

from deployments.routing import (
    PREFILL_TOKEN_WEIGHT,
    AffinityIndex,
    Candidate,
    DecodeJob,
    InFlight,
    RoutingSettings,
    ThroughputWindow,
    decoder_candidates,
    encoder_candidates,
    prefix_block_hashes,
    rank,
)
from serve.messages import DecoderLoad, EncoderLoad

SETTINGS = RoutingSettings()
NOW = 1000.0


def c(replica_id, estimate=0.1, affinity=0.0, fits=True) -> Candidate:
    return Candidate(replica_id, estimate_s=estimate, affinity=affinity, fits=fits)


@pytest.mark.parametrize(
    ("candidates", "expected"),
    [
        pytest.param([], [], id="no-candidates"),
        pytest.param([c("a")], [["a"]], id="one"),
        pytest.param([c("a", 5.0), c("b", 1.0)], [["b"], ["a"]], id="soonest-first"),
        pytest.param([c("b"), c("a")], [["a"], ["b"]], id="exact-tie-by-id"),
        # a holds the prefix: 1.4x the best estimate is within the 1.5x tolerance ...
        pytest.param([c("a", 1.4, affinity=64), c("b", 1.0)], [["a"], ["b"]], id="affinity-within-tolerance"),
        # ... and 2x is not: the load wins.
        pytest.param([c("a", 2.0, affinity=64), c("b", 1.0)], [["b"], ["a"]], id="affinity-beyond-tolerance"),
        pytest.param(
            [c("a", affinity=64), c("b", affinity=128), c("x")],
            [["b"], ["a"], ["x"]],
            id="most-affinity-first",
        ),
        pytest.param([c("a", 0.01, fits=False), c("b", 9.0)], [["b"], ["a"]], id="kv-full-last"),
        pytest.param(
            [c("a", affinity=64, fits=False), c("b", 9.0)], [["b"], ["a"]], id="kv-full-beats-affinity"
        ),
        pytest.param(
            [c("a", 0.6, fits=False), c("b", fits=False)], [["b"], ["a"]], id="all-full-by-estimate"
        ),
    ],
)
def test_rank(candidates, expected):
    assert rank(candidates, SETTINGS) == expected


def test_near_idle_replicas_keep_their_affinity_by_the_slack():
    # 0.06 s against 0.02 s is 3x, but both are idle: the slack (50 ms) keeps the conversation home.
    assert rank([c("a", 0.06, affinity=64), c("b", 0.02)], SETTINGS)[0] == ["a"]


def load(**fields) -> DecoderLoad:
    return DecoderLoad(**{"measured_at": NOW, "kv_cache_tokens": 10_000, **fields})


JOB = DecodeJob(prompt_tokens=100, max_new_tokens=50)
C = SETTINGS.step_fixed_sequences


def by_id(candidates) -> dict[str, Candidate]:
    return {candidate.replica_id: candidate for candidate in candidates}


def estimates(loads, in_flight=None, matches=None, job=JOB, replica_ids=None) -> dict[str, float]:
    replica_ids = replica_ids or sorted(loads)
    candidates = decoder_candidates(replica_ids, loads, in_flight or {}, matches or {}, job, NOW, SETTINGS)
    return {x.replica_id: x.estimate_s for x in candidates}


def test_the_estimate_is_the_requests_tokens_at_the_step_time_of_the_batch_it_joins():
    # 4 running at 40 ms a step (batch 4): joining makes 5, a step of 40 ms x (5 + C) / (4 + C).
    (estimate,) = estimates({"a": load(running=4, step_s=0.04, batch=4)}).values()
    assert estimate == pytest.approx(0.04 * (5 + C) / (4 + C) * (50 + PREFILL_TOKEN_WEIGHT * 100))


def test_a_replica_at_half_speed_takes_twice_as_long():
    found = estimates({"slow": load(step_s=0.06, batch=4), "fast": load(step_s=0.03, batch=4)})
    assert found["slow"] == pytest.approx(2 * found["fast"])


def test_a_busier_replica_does_not_look_faster():
    # Same hardware (30 ms + 2 ms per sequence): a's batch of 10 makes more tokens per second
    # than b's batch of 2, but a new request finishes sooner on b.
    busy = load(running=10, step_s=0.030 + 0.002 * 10, batch=10)
    quiet = load(running=2, step_s=0.030 + 0.002 * 2, batch=2)
    found = estimates({"busy": busy, "quiet": quiet})
    assert found["quiet"] < found["busy"]


def test_prompt_tokens_in_the_prefix_cache_cost_nothing():
    loads = {"a": load(step_s=0.03, batch=1), "b": load(step_s=0.03, batch=1)}
    found = by_id(decoder_candidates(["a", "b"], loads, {}, {"a": 64}, JOB, NOW, SETTINGS))
    step = 0.03 * (1 + C) / (1 + C)
    assert found["b"].estimate_s - found["a"].estimate_s == pytest.approx(step * PREFILL_TOKEN_WEIGHT * 64)
    assert (found["a"].affinity, found["b"].affinity) == (64, 0)


def test_a_prefix_every_replica_holds_pulls_nowhere():
    candidates = decoder_candidates(["a", "b"], {}, {}, {"a": 64, "b": 64}, JOB, NOW, SETTINGS)
    assert [x.affinity for x in candidates] == [0, 0]
    a, b = decoder_candidates(["a", "b"], {}, {}, {"a": 192, "b": 64}, JOB, NOW, SETTINGS)
    # a holds more than the prompt beyond b's share: at most the prompt counts.
    assert (a.affinity, b.affinity) == (100 - 64, 0)


def test_held_requests_are_the_larger_of_the_reported_and_the_routers_own():
    step = {"step_s": 0.03, "batch": 1}
    reported = estimates({"a": load(running=6, **step)})["a"]
    live = {"a": InFlight(requests=2, work=100)}
    assert estimates({"a": load(running=6, **step)}, in_flight=live)["a"] == pytest.approx(reported)
    live = {"a": InFlight(requests=9, work=900)}
    assert estimates({"a": load(running=6, **step)}, in_flight=live)["a"] > reported


def test_a_full_batch_adds_the_wait_for_a_free_slot():
    # 8 held, 4 run at once: the new request is 5th in line for a slot, the held ones have
    # 800 / 8 tokens left each: it waits (9 - 4) / 4 x 100 tokens' worth of steps.
    full = load(running=4, waiting=4, max_running=4, decode_tokens_pending=800, step_s=0.03, batch=4)
    step = 0.03  # the batch stays at 4
    expected = step * ((9 - 4) / 4 * 100 + 50 + PREFILL_TOKEN_WEIGHT * 100)
    assert estimates({"a": full})["a"] == pytest.approx(expected)


def test_a_replica_with_no_stats_yet_takes_the_median_step_of_the_others():
    loads = {r: load(step_s=step, batch=0) for r, step in (("a", 0.01), ("b", 0.03), ("c", 0.02))}
    found = estimates(loads, replica_ids=["a", "b", "c", "new"])
    assert found["new"] == pytest.approx(found["c"])


def test_with_no_steps_measured_anywhere_the_default_step_is_used():
    found = estimates({"a": load()}, replica_ids=["a", "b"])
    assert (
        found["a"] == found["b"] == pytest.approx(SETTINGS.default_step_s * (50 + PREFILL_TOKEN_WEIGHT * 100))
    )


def test_stale_stats_count_for_speed_only_and_very_stale_ones_not_at_all():
    fresh = estimates({"a": load(step_s=0.06, batch=0)})["a"]
    stale = load(measured_at=NOW - 2 * SETTINGS.stale_after_s, step_s=0.06, batch=0, running=50)
    assert estimates({"a": stale})["a"] == pytest.approx(fresh)
    ancient = load(measured_at=NOW - 100 * SETTINGS.stale_after_s, step_s=0.06, batch=0)
    assert estimates({"a": ancient})["a"] == pytest.approx(
        SETTINGS.default_step_s * (50 + PREFILL_TOKEN_WEIGHT * 100)
    )


def test_a_full_kv_cache_is_a_hard_constraint():
    # 150 tokens of 10,000 on top of 0.94 passes the 0.95 limit; on top of 0.9 it does not.
    a, b = decoder_candidates(
        ["a", "b"],
        {"a": load(kv_cache_usage=0.94), "b": load(kv_cache_usage=0.9)},
        {},
        {},
        JOB,
        NOW,
        SETTINGS,
    )
    assert (a.fits, b.fits) == (False, True)
    # Stale stats say nothing about the KV cache now.
    (a,) = decoder_candidates(
        ["a"], {"a": load(kv_cache_usage=0.99, measured_at=NOW - 60)}, {}, {}, JOB, NOW, SETTINGS
    )
    assert a.fits


def test_a_vanished_replica_is_not_a_candidate():
    live = {"gone": InFlight(requests=1, work=10)}
    loads = {"gone": load(tokens_per_s=1)}
    candidates = decoder_candidates(["a"], loads, live, {"gone": 64}, JOB, NOW, SETTINGS)
    assert [x.replica_id for x in candidates] == ["a"]
    assert candidates[0].affinity == 0
    assert rank(decoder_candidates([], loads, live, {}, JOB, NOW, SETTINGS), SETTINGS) == []


def test_a_slow_replica_gets_work_once_the_fast_one_holds_more():
    loads = {"slow": load(step_s=0.06, batch=0), "fast": load(step_s=0.03, batch=0)}
    live = {"slow": InFlight(requests=2, work=100), "fast": InFlight(requests=3, work=150)}
    ranked = rank(decoder_candidates(["slow", "fast"], loads, live, {}, JOB, NOW, SETTINGS), SETTINGS)
    assert ranked[0] == ["fast"]
    live["fast"] = InFlight(requests=40, work=2000)
    ranked = rank(decoder_candidates(["slow", "fast"], loads, live, {}, JOB, NOW, SETTINGS), SETTINGS)
    assert ranked[0] == ["slow"]


def test_encoder_prefers_the_replica_holding_the_images_unless_it_is_much_busier():
    hashes = ["a" * 64, "b" * 64]
    loads = {
        "holder": EncoderLoad(measured_at=NOW, images_per_s=10, held_images=("a" * 12, "b" * 12)),
        "other": EncoderLoad(measured_at=NOW, images_per_s=10),
    }
    candidates = encoder_candidates(["holder", "other"], loads, {}, {}, hashes, NOW, SETTINGS)
    assert by_id(candidates)["holder"].estimate_s == 0
    assert by_id(candidates)["other"].estimate_s == pytest.approx(2 / 10)
    assert rank(candidates, SETTINGS)[0] == ["holder"]
    busy = {"holder": InFlight(requests=4, work=20)}
    candidates = encoder_candidates(["holder", "other"], loads, busy, {}, hashes, NOW, SETTINGS)
    assert rank(candidates, SETTINGS)[0] == ["other"]


def test_encoder_counts_images_it_routed_before_the_replica_reports_them():
    candidates = encoder_candidates(["a", "b"], {}, {}, {"b": 1}, ["x" * 64], NOW, SETTINGS)
    assert by_id(candidates)["b"].affinity == 1
    assert rank(candidates, SETTINGS)[0] == ["b"]


def test_prefix_block_hashes_are_chained():
    shared = list(range(200))
    first = prefix_block_hashes([*shared, 1, 2, 3], block_tokens=64)
    second = prefix_block_hashes([*shared[:100], 9, *shared[101:], 1, 2, 3], block_tokens=64)
    assert len(first) == 3  # 203 tokens: three full blocks, the rest is not a block yet
    assert first[0] == second[0]
    assert first[1] != second[1] and first[2] != second[2]  # a change in block 1 changes every later hash


def test_affinity_index_matches_prefixes_and_forgets_replicas():
    index = AffinityIndex()
    conversation = prefix_block_hashes(list(range(320)), block_tokens=64)  # 5 blocks
    index.record(conversation[:4], "a")
    index.record(conversation[:2], "b")
    assert index.prefix_matches(conversation) == {"a": 4, "b": 2}
    index.forget({"a"})
    assert index.prefix_matches(conversation) == {"b": 2}
    assert index.holders(["x", *conversation]) == {"b": 2}


def test_affinity_index_drops_the_least_recently_used_keys():
    index = AffinityIndex(max_keys=2)
    index.record(["k1", "k2"], "a")
    index.record(["k3"], "b")
    assert index.holders(["k1", "k2", "k3"]) == {"a": 1, "b": 1}


def test_throughput_counts_busy_time_only():
    window = ThroughputWindow(window_s=30, max_step_s=2)
    window.record(0.0, 0, busy=True)
    window.record(0.5, 50, busy=True)  # 100/s over the half second
    window.record(100.5, 10, busy=True)  # after an idle spell: not a 100 s step
    window.record(101.0, 50, busy=True)
    assert window.rate() == pytest.approx(100.0)
    window.record(101.5, 0, busy=False)
    assert window.rate() == pytest.approx(100.0)


def test_throughput_forgets_work_older_than_its_window():
    window = ThroughputWindow(window_s=10)
    window.add(0.0, 1.0, 10)
    window.add(20.0, 1.0, 50)
    assert window.rate() == 50


def test_holding_a_single_image_is_affinity():
    # The encoder's affinity counts images: one held image is worth a little waiting.
    assert rank([c("holder", 1.2, affinity=1), c("b", 1.0)], SETTINGS) == [["holder"], ["b"]]


def test_of_two_replicas_holding_as_much_the_sooner_one_is_preferred():
    ranked = rank([c("slow", 0.5, affinity=64), c("quick", 0.3, affinity=64), c("idle", 0.2)], SETTINGS)
    assert ranked[0] == ["quick"]


def test_a_holder_exactly_at_the_tolerance_keeps_its_affinity():
    settings = RoutingSettings(affinity_tolerance=1.5, affinity_slack_s=0.25)
    best_s = 2.0
    limit_s = best_s * settings.affinity_tolerance + settings.affinity_slack_s
    assert rank([c("holder", limit_s, affinity=64), c("b", best_s)], settings)[0] == ["holder"]
    assert rank([c("holder", limit_s + 0.01, affinity=64), c("b", best_s)], settings)[0] == ["b"]


def test_stats_exactly_stale_after_s_old_still_count_for_load():
    step = {"step_s": 0.03, "batch": 1}
    idle = estimates({"a": load(**step)})["a"]
    at_the_limit = load(measured_at=NOW - SETTINGS.stale_after_s, running=6, **step)
    assert estimates({"a": at_the_limit})["a"] > idle


def test_step_times_count_for_speed_for_a_minute():
    speed_limit_s = 6 * SETTINGS.stale_after_s  # a minute with the default settings
    assert estimates({"a": load(step_s=0.06, batch=0, measured_at=NOW - speed_limit_s)})[
        "a"
    ] == pytest.approx(estimates({"a": load(step_s=0.06, batch=0)})["a"])
    assert estimates({"a": load(step_s=0.06, batch=0, measured_at=NOW - speed_limit_s - 1)})[
        "a"
    ] == pytest.approx(SETTINGS.default_step_s * (50 + PREFILL_TOKEN_WEIGHT * 100))


def test_a_replica_without_stats_is_loaded_by_the_routers_own_count():
    # b has never reported: the 3 requests this router sent it make the batch a new one joins 4.
    live = {"b": InFlight(requests=3, work=300)}
    found = estimates({}, in_flight=live, replica_ids=["a", "b"])
    unit_step_s = SETTINGS.default_step_s / (1 + C)
    work = 50 + PREFILL_TOKEN_WEIGHT * 100
    assert found["a"] == pytest.approx(unit_step_s * (1 + C) * work)
    assert found["b"] == pytest.approx(unit_step_s * (4 + C) * work)


def test_a_batch_with_free_slots_is_joined_without_waiting():
    # 2 running of at most 8 at 40 ms a step: the new request makes 3, no wait for a slot.
    (estimate,) = estimates({"a": load(running=2, max_running=8, step_s=0.04, batch=2)}).values()
    assert estimate == pytest.approx(0.04 * (3 + C) / (2 + C) * (50 + PREFILL_TOKEN_WEIGHT * 100))


def test_a_request_first_in_line_for_a_full_batch_waits_for_one_slot():
    # 4 running of at most 4, 400 tokens left among them (100 each): the new request waits
    # for one slot, 1/4 of the batch finishing, 100 tokens' worth of steps.
    full = load(running=4, max_running=4, decode_tokens_pending=400, step_s=0.03, batch=4)
    expected = 0.03 * (1 / 4 * 100 + 50 + PREFILL_TOKEN_WEIGHT * 100)
    assert estimates({"a": full})["a"] == pytest.approx(expected)


def test_a_replica_running_one_request_at_a_time_waits_for_it_to_finish():
    one_slot = load(running=1, max_running=1, decode_tokens_pending=70, step_s=0.02, batch=1)
    expected = 0.02 * (70 + 50 + PREFILL_TOKEN_WEIGHT * 100)
    assert estimates({"a": one_slot})["a"] == pytest.approx(expected)


def test_a_replica_that_does_not_report_its_kv_cache_size_takes_the_request():
    (a,) = decoder_candidates(
        ["a"], {"a": load(kv_cache_tokens=0, kv_cache_usage=0.99)}, {}, {}, JOB, NOW, SETTINGS
    )
    assert a.fits


@pytest.mark.parametrize("kv_cache_tokens", [1, JOB.prompt_tokens + JOB.max_new_tokens - 1])
def test_a_kv_cache_smaller_than_the_request_never_takes_it(kv_cache_tokens):
    (a,) = decoder_candidates(["a"], {"a": load(kv_cache_tokens=kv_cache_tokens)}, {}, {}, JOB, NOW, SETTINGS)
    assert not a.fits


def test_a_request_that_fills_the_kv_cache_exactly_to_the_limit_fits():
    settings = RoutingSettings(kv_usage_limit=0.75)
    needed_tokens = JOB.prompt_tokens + JOB.max_new_tokens
    exactly = load(kv_cache_tokens=needed_tokens * 4, kv_cache_usage=0.5)  # 0.5 + 1/4 = 0.75
    (a,) = decoder_candidates(["a"], {"a": exactly}, {}, {}, JOB, NOW, settings)
    assert a.fits


def encoder_estimates(loads, replica_ids, images=1) -> dict[str, float]:
    hashes = [f"{i:064x}" for i in range(images)]
    candidates = encoder_candidates(replica_ids, loads, {}, {}, hashes, NOW, SETTINGS)
    return {x.replica_id: x.estimate_s for x in candidates}


def test_an_encoder_is_as_fast_as_it_measured_for_a_minute():
    speed_limit_s = 6 * SETTINGS.stale_after_s
    for age_s in (0.0, 5.0, speed_limit_s):
        loads = {"a": EncoderLoad(measured_at=NOW - age_s, images_per_s=20)}
        assert encoder_estimates(loads, ["a"], images=4) == {"a": pytest.approx(4 / 20)}
    older = {"a": EncoderLoad(measured_at=NOW - speed_limit_s - 1, images_per_s=20)}
    assert encoder_estimates(older, ["a"], images=4) == {
        "a": pytest.approx(4 / SETTINGS.default_images_per_s)
    }


def test_an_encoder_without_stats_takes_the_median_rate_of_the_others():
    loads = {
        "a": EncoderLoad(measured_at=NOW, images_per_s=20),
        "b": EncoderLoad(measured_at=NOW, images_per_s=40),
    }
    found = encoder_estimates(loads, ["a", "b", "new"], images=3)
    assert found["new"] == pytest.approx(3 / statistics.median([20, 40]))


def test_a_key_remembers_every_replica_it_was_sent_to():
    index = AffinityIndex()
    index.record(["image"], "a")
    index.record(["image"], "b")
    index.record(["image"], "a")
    assert index.holders(["image"]) == {"a": 1, "b": 1}


def test_a_record_at_the_same_instant_adds_no_busy_time():
    window = ThroughputWindow(window_s=30, max_step_s=2)
    window.record(1000.0, 0, busy=True)
    window.record(1000.5, 50, busy=True)
    window.record(1000.5, 50, busy=True)
    assert window.rate() == pytest.approx(100.0)


def test_throughput_measures_each_step_from_the_previous_record():
    window = ThroughputWindow(window_s=30, max_step_s=2)
    window.record(1000.0, 0, busy=True)
    window.record(1000.5, 10, busy=True)  # 20/s
    window.record(1002.5, 100, busy=True)  # a step of exactly max_step_s: 50/s
    assert window.rate() == pytest.approx(110 / 2.5)
    assert window.mean_step() == pytest.approx((2.5 / 2, 110 / 2))


def test_work_exactly_window_s_old_is_still_counted():
    window = ThroughputWindow(window_s=10)
    window.add(0.0, 1.0, 10)
    window.add(10.0, 1.0, 50)
    assert window.rate() == pytest.approx(60 / 2)


def test_a_window_with_nothing_recorded_has_no_rate_and_no_step():
    window = ThroughputWindow()
    assert window.rate() == 0.0
    assert window.mean_step() == (0.0, 0.0)
    window.record(1000.0, 10, busy=True)  # the first record only starts the clock
    assert window.rate() == 0.0
