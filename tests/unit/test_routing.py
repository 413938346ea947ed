"""The routing policy (deployments/routing.py) on hand-built replica states, without Ray."""

from __future__ import annotations

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


def c(replica_id, queued=0.0, new=10.0, rate=100.0, affinity=0.0, fits=True) -> Candidate:
    return Candidate(replica_id, queued_work=queued, new_work=new, rate=rate, affinity=affinity, fits=fits)


@pytest.mark.parametrize(
    ("candidates", "expected"),
    [
        pytest.param([], [], id="no-candidates"),
        pytest.param([c("a")], [["a"]], id="one"),
        pytest.param([c("a", queued=500), c("b", queued=100)], [["b"], ["a"]], id="less-queued-first"),
        pytest.param(
            [c("a", queued=300, rate=100), c("b", queued=300, rate=300)], [["b"], ["a"]], id="faster-first"
        ),
        # a: (200 + 10) / 100 = 2.1 s; b: (300 + 10) / 300 = 1.03 s: the slower replica with less work loses.
        pytest.param(
            [c("a", queued=200, rate=100), c("b", queued=300, rate=300)], [["b"], ["a"]], id="work-over-speed"
        ),
        pytest.param([c("b"), c("a")], [["a"], ["b"]], id="exact-tie-by-id"),
        # a holds the prefix: 1.4x the best estimate is within the 1.5x tolerance.
        pytest.param(
            [c("a", queued=130, affinity=64), c("b", queued=90)],
            [["a"], ["b"]],
            id="affinity-within-tolerance",
        ),
        # ... and 2x is not: the load wins.
        pytest.param(
            [c("a", queued=190, affinity=64), c("b", queued=90)],
            [["b"], ["a"]],
            id="affinity-beyond-tolerance",
        ),
        pytest.param(
            [c("a", affinity=64), c("b", affinity=128), c("x")],
            [["b"], ["a"], ["x"]],
            id="most-affinity-first",
        ),
        pytest.param([c("a", rate=1000, fits=False), c("b", queued=900)], [["b"], ["a"]], id="kv-full-last"),
        pytest.param(
            [c("a", fits=False, affinity=64), c("b", queued=900)], [["b"], ["a"]], id="kv-full-beats-affinity"
        ),
        pytest.param(
            [c("a", queued=50, fits=False), c("b", fits=False)], [["b"], ["a"]], id="all-full-by-estimate"
        ),
    ],
)
def test_rank(candidates, expected):
    assert rank(candidates, SETTINGS) == expected


def test_near_idle_replicas_keep_their_affinity_by_the_slack():
    # 0.06 s against 0.02 s is 3x, but both are idle: the slack (50 ms) keeps the conversation home.
    holder, other = c("a", new=6, affinity=64), c("b", new=2)
    assert rank([holder, other], SETTINGS)[0] == ["a"]


def load(**fields) -> DecoderLoad:
    return DecoderLoad(**{"measured_at": NOW, "kv_cache_tokens": 10_000, **fields})


JOB = DecodeJob(prompt_tokens=100, max_new_tokens=50)


def by_id(candidates) -> dict[str, Candidate]:
    return {candidate.replica_id: candidate for candidate in candidates}


def test_decoder_work_counts_prompt_tokens_at_their_weight_and_cached_ones_not_at_all():
    (a,) = decoder_candidates(["a"], {"a": load(tokens_per_s=50)}, {}, {"a": 64}, JOB, NOW, SETTINGS)
    assert a.new_work == pytest.approx(50 + PREFILL_TOKEN_WEIGHT * (100 - 64))
    assert a.affinity == 64
    assert a.rate == 50


def test_a_prefix_every_replica_holds_pulls_nowhere():
    matches = {"a": 64, "b": 64}
    candidates = decoder_candidates(["a", "b"], {}, {}, matches, JOB, NOW, SETTINGS)
    assert [x.affinity for x in candidates] == [0, 0]
    matches = {"a": 192, "b": 64}
    a, b = decoder_candidates(["a", "b"], {}, {}, matches, JOB, NOW, SETTINGS)
    # a holds more than the prompt beyond b's share: at most the prompt counts.
    assert (a.affinity, b.affinity) == (100 - 64, 0)


def test_queued_work_is_the_larger_of_the_reported_and_the_routers_own():
    reported = load(decode_tokens_pending=400, prefill_tokens_pending=1000)
    live = {"a": InFlight(requests=2, work=100, prefill_tokens=50)}
    (a,) = decoder_candidates(["a"], {"a": reported}, live, {}, JOB, NOW, SETTINGS)
    assert a.queued_work == pytest.approx(400 + PREFILL_TOKEN_WEIGHT * 1000)
    live = {"a": InFlight(requests=9, work=2000, prefill_tokens=0)}
    (a,) = decoder_candidates(["a"], {"a": reported}, live, {}, JOB, NOW, SETTINGS)
    assert a.queued_work == 2000


def test_a_replica_with_no_stats_yet_takes_the_median_speed_of_the_others():
    loads = {"a": load(tokens_per_s=100), "b": load(tokens_per_s=300), "c": load(tokens_per_s=200)}
    candidates = by_id(decoder_candidates(["a", "b", "c", "new"], loads, {}, {}, JOB, NOW, SETTINGS))
    assert candidates["new"].rate == 200
    assert candidates["new"].queued_work == 0


def test_with_no_speed_measured_anywhere_the_default_speed_is_used():
    candidates = decoder_candidates(["a", "b"], {"a": load()}, {}, {}, JOB, NOW, SETTINGS)
    assert [x.rate for x in candidates] == [SETTINGS.default_tokens_per_s] * 2


def test_stale_stats_count_for_speed_only_and_very_stale_ones_not_at_all():
    stale = load(measured_at=NOW - 2 * SETTINGS.stale_after_s, tokens_per_s=80, decode_tokens_pending=5000)
    (a,) = decoder_candidates(["a"], {"a": stale}, {}, {}, JOB, NOW, SETTINGS)
    assert (a.rate, a.queued_work) == (80, 0)
    ancient = load(measured_at=NOW - 100 * SETTINGS.stale_after_s, tokens_per_s=80)
    (a,) = decoder_candidates(["a"], {"a": ancient}, {}, {}, JOB, NOW, SETTINGS)
    assert a.rate == SETTINGS.default_tokens_per_s


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


def test_a_slow_replica_gets_less_work_than_a_fast_one_with_the_same_queue():
    loads = {"slow": load(tokens_per_s=50), "fast": load(tokens_per_s=100)}
    live = {"slow": InFlight(requests=2, work=100), "fast": InFlight(requests=3, work=150)}
    ranked = rank(decoder_candidates(["slow", "fast"], loads, live, {}, JOB, NOW, SETTINGS), SETTINGS)
    assert ranked[0] == ["fast"]


def test_encoder_prefers_the_replica_holding_the_images_unless_it_is_much_busier():
    hashes = ["a" * 64, "b" * 64]
    loads = {
        "holder": EncoderLoad(measured_at=NOW, images_per_s=10, held_images=("a" * 12, "b" * 12)),
        "other": EncoderLoad(measured_at=NOW, images_per_s=10),
    }
    candidates = encoder_candidates(["holder", "other"], loads, {}, {}, hashes, NOW, SETTINGS)
    assert by_id(candidates)["holder"].new_work == 0
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
