"""The router benchmark's workload and arithmetic (benchmarks/router.py), without Ray."""

from __future__ import annotations

import itertools

import pytest

from benchmarks.router import Outcome, RouterBenchSettings, goodput_ratio, markdown, summarise, workload

SETTINGS = RouterBenchSettings(seconds=20, ttft_target_s=1.0, tpot_target_s=0.1)


def test_the_workload_is_the_same_for_both_routers_and_near_its_rate():
    turns = workload(SETTINGS, rate=6.0)
    assert turns == workload(SETTINGS, rate=6.0)
    assert [t.at_s for t in turns] == sorted(t.at_s for t in turns)
    # Conversations start within the 20 s; their later turns come after.
    starts = [t for t in turns if len(t.prompt_token_ids) == SETTINGS.opener_tokens]
    assert 6.0 * 20 / SETTINGS.turns * 0.6 < len(starts) < 6.0 * 20 / SETTINGS.turns * 1.4
    assert len(turns) == len(starts) * SETTINGS.turns


def test_each_turn_resends_the_conversation_so_far():
    turns = workload(SETTINGS, rate=2.0)
    first = turns[0]
    later = [t for t in turns if t.prompt_token_ids[: SETTINGS.opener_tokens] == first.prompt_token_ids]
    assert len(later) == SETTINGS.turns
    for earlier, next_turn in itertools.pairwise(later):
        assert next_turn.prompt_token_ids[: len(earlier.prompt_token_ids)] == earlier.prompt_token_ids
        added = len(next_turn.prompt_token_ids) - len(earlier.prompt_token_ids)
        assert added == earlier.max_tokens + SETTINGS.user_tokens
        assert next_turn.at_s - earlier.at_s == pytest.approx(SETTINGS.turn_gap_s)


def test_goodput_counts_requests_meeting_both_targets():
    outcomes = [
        Outcome(0.5, 0.05, 40),  # good
        Outcome(1.5, 0.05, 40),  # too slow to start
        Outcome(0.5, 0.2, 40),  # too slow per token
        Outcome(0.2, None, 1),  # one token: no TPOT, good
        Outcome(None, None, 0, error="RayActorError"),
    ]
    summary = summarise(outcomes, seconds=25.0, settings=SETTINGS)
    assert (summary["requests"], summary["errors"], summary["good"]) == (5, 1, 2)
    assert summary["goodput_rps"] == pytest.approx(2 / 20)
    assert summary["good_fraction"] == pytest.approx(2 / 5)
    assert (summary["missed_ttft"], summary["missed_tpot"]) == (1, 1)
    assert summary["output_tokens_per_s"] == pytest.approx(121 / 25.0)


def run(router, rate, goodput, fraction) -> dict:
    return {"router": router, "rate": rate, "goodput_rps": goodput, "good_fraction": fraction}


def test_the_ratio_is_taken_at_the_highest_rate_the_default_still_serves():
    runs = [
        run("serve_default", 4, 3.0, 0.9),
        run("throughput", 4, 3.5, 1.0),
        run("serve_default", 8, 4.0, 0.5),
        run("throughput", 8, 6.0, 0.95),
        run("serve_default", 10, 0.5, 0.05),
        run("throughput", 10, 2.0, 0.2),
    ]
    assert goodput_ratio(runs) == (pytest.approx(1.5), 8)
    assert goodput_ratio([run("serve_default", 4, 0.1, 0.1), run("throughput", 4, 3, 1)]) == (None, None)


def test_the_results_page_states_the_ratio_and_every_run():
    runs = [
        {
            **run(router, 4.0, 3.0, 0.9),
            "ttft_p50_s": 0.1,
            "ttft_p99_s": 0.5,
            "tpot_p50_s": 0.05,
            "output_tokens_per_s": 100.0,
            "prefix_cache_hit_fraction": 0.5,
        }
        for router in ("serve_default", "throughput")
    ]
    results = {
        "goodput_ratio": 1.0,
        "goodput_ratio_at_rate": 4.0,
        "target": 1.3,
        "machine": "test",
        "date": "2026-12-06",
        "settings": {k: v for k, v in vars(SETTINGS).items() if k != "output"},
        "runs": runs,
    }
    page = markdown(results)
    assert "`goodput_ratio` **1.00** at 4 requests/s" in page
    assert page.count("| 4 | ") == 2
