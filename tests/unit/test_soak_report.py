"""The soak's report: every request counted once, lost and hung ones apart, latency of completed ones only."""

from benchmarks.soak import STAGES, summary


def test_the_report_counts_every_outcome_and_times_only_completed_requests():
    results = [("text", "ok", float(i)) for i in range(1, 101)] + [
        ("text-stream", "hung", 120.0),
        ("image-new", "http-429", 0.01),
        ("image-new", "cut", 3.0),
        ("text-stream", "error-event-request_timeout", 600.0),
    ]
    before = dict.fromkeys(STAGES, 100.0)
    after = dict.fromkeys(STAGES, 100.0) | {"decoder": 130.5}
    report = summary(results, before, after, {"minutes": 1})
    assert report["requests"] == 104
    assert report["outcomes"] == {
        "ok": 100,
        "hung": 1,
        "http-429": 1,
        "cut": 1,
        "error-event-request_timeout": 1,
    }
    assert report["lost_or_hung"] == 2
    assert report["latency_p50_s"] == 50.5
    assert report["latency_p99_s"] == 99.0
    assert report["by_kind"]["image-new"] == {"http-429": 1, "cut": 1}
    assert report["rss_growth_mib"]["decoder"] == 30.5
    assert report["rss_growth_mib"]["ingress"] == 0.0
