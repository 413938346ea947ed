"""The benchmark report's arithmetic: ratios, headline figures, targets (no servers)."""

from __future__ import annotations

import pytest

from benchmarks import report


def _run(workload: str, stack: str, concurrency: int, *, tps: float, ttft: float, failed: int = 0) -> dict:
    return {
        "workload": workload,
        "stack": stack,
        "concurrency": concurrency,
        "failed": failed,
        "request_throughput": tps / 100,
        "output_throughput": tps,
        "request_goodput": tps / 200,
        "median_ttft_ms": ttft,
        "p99_ttft_ms": ttft * 3,
        "median_tpot_ms": 10.0,
        "p99_tpot_ms": 20.0,
    }


RUNS = [
    _run("text", "ours", 1, tps=90, ttft=30),
    _run("text", "vllm", 1, tps=100, ttft=20),
    _run("text", "ours", 8, tps=380, ttft=55),
    _run("text", "vllm", 8, tps=400, ttft=50),
    _run("image-repeat", "ours", 1, tps=100, ttft=40),
    _run("image-repeat", "vllm", 1, tps=100, ttft=80),
    _run("image-repeat", "ours", 8, tps=100, ttft=90, failed=1),
    _run("image-repeat", "vllm", 8, tps=100, ttft=100),
]


def test_ratio_rows_divide_ours_by_vllm_per_workload_and_concurrency():
    rows = {(row["workload"], row["concurrency"]): row for row in report.ratio_table(RUNS)}
    assert set(rows) == {("text", 1), ("text", 8), ("image-repeat", 1), ("image-repeat", 8)}
    assert rows["text", 1]["output_throughput_ratio"] == pytest.approx(0.9)
    assert rows["text", 1]["median_ttft_ms_ratio"] == pytest.approx(1.5)
    assert rows["text", 1]["ttft_p50_overhead_ms"] == pytest.approx(10.0)
    assert rows["image-repeat", 8]["failed"] == {"ours": 1, "vllm": 0}


def test_repeats_are_merged_by_their_median_and_failures_add_up():
    repeated = [
        _run("text", "ours", 4, tps=90, ttft=30),
        _run("text", "ours", 4, tps=300, ttft=900, failed=2),  # one noisy measurement
        _run("text", "ours", 4, tps=110, ttft=50),
        _run("text", "vllm", 4, tps=100, ttft=20),
        _run("text", "vllm", 4, tps=120, ttft=40),
        _run("text", "vllm", 4, tps=80, ttft=60),
    ]
    (row,) = report.ratio_table(repeated)
    assert row["output_throughput_ratio"] == pytest.approx(1.1)  # median 110 / median 100
    assert row["ttft_p50_overhead_ms"] == pytest.approx(10.0)  # median 50 - median 40
    assert row["failed"] == {"ours": 2, "vllm": 0}
    assert row["repeats"] == {"ours": 3, "vllm": 3}
    assert report.summary(repeated)["failed_requests"] == 2


def test_summary_takes_throughput_at_the_top_concurrency_and_the_worst_latency():
    summary = report.summary(RUNS)
    assert summary["text_output_tps_ratio"] == pytest.approx(0.95)  # at concurrency 8
    assert summary["text_output_tps_ratio_min"] == pytest.approx(0.9)
    assert summary["text_ttft_p50_overhead_ms"] == pytest.approx(10.0)  # worse of +10 and +5
    assert summary["image_repeat_ttft_p50_ratio"] == pytest.approx(0.9)  # worse of 0.5 and 0.9
    assert summary["targets_met"] == {
        "text_output_tps_ratio": True,
        "text_ttft_p50_overhead_ms": True,
        "image_repeat_ttft_p50_ratio": True,
    }
    assert summary["failed_requests"] == 1


def test_a_workload_without_baseline_has_no_ratios_and_no_verdict():
    ours_only = [run for run in RUNS if not (run["workload"] == "image-repeat" and run["stack"] == "vllm")]
    summary = report.summary(ours_only)
    assert summary["image_repeat_ttft_p50_ratio"] is None
    assert summary["targets_met"]["image_repeat_ttft_p50_ratio"] is None
    assert summary["text_output_tps_ratio"] == pytest.approx(0.95)


def _results(runs: list[dict], workloads: dict, **more) -> dict:
    """What `runner.run` hands to `report.markdown`, for these runs."""
    return {
        "name": "t",
        "date": "now",
        "model": "demo",
        "layout": None,
        "load_generator": "vllm.benchmarks.serve",
        "goodput_target_ms": {"ttft": 1000.0},
        "workloads": workloads,
        "table": report.ratio_table(runs),
        "summary": report.summary(runs),
        **more,
    }


def test_markdown_table_has_a_row_per_ratio_row():
    results = _results(
        RUNS,
        {"text": {"description": "random text"}, "image-repeat": {"baseline_unavailable": "why"}},
    )
    text = report.markdown(results)
    assert sum(line.startswith("| text |") for line in text.splitlines()) == 2
    assert "vLLM's server could not run it here: why" in text


PEER_RUNS = [
    *RUNS,
    _run("text", "ray-serve-llm", 1, tps=80, ttft=70),
    _run("text", "ray-serve-llm", 8, tps=200, ttft=250, failed=3),
]


def test_a_peer_gets_its_own_ratios_against_vllm_and_leaves_ours_alone():
    assert report.ratio_table(PEER_RUNS) == report.ratio_table(RUNS)
    rows = {row["concurrency"]: row for row in report.ratio_table(PEER_RUNS, stack="ray-serve-llm")}
    assert set(rows) == {1, 8}  # text only: the peer ran no image workload
    assert rows[8]["output_throughput_ratio"] == pytest.approx(0.5)  # 200 / 400
    assert rows[1]["ttft_p50_overhead_ms"] == pytest.approx(50.0)  # 70 - 20
    assert rows[8]["failed"] == {"ray-serve-llm": 3, "vllm": 0}
    peer = report.summary(PEER_RUNS, stack="ray-serve-llm")
    assert peer["text_output_tps_ratio"] == pytest.approx(0.5)
    assert peer["image_repeat_ttft_p50_ratio"] is None
    assert peer["failed_requests"] == 3
    # The peer's failures are its own: ours' summary counts ours' and vLLM's runs only.
    assert report.summary(PEER_RUNS)["failed_requests"] == 1


def test_markdown_has_a_section_per_peer():
    results = _results(
        PEER_RUNS,
        {"text": {"description": "random text"}},
        peers={
            "ray-serve-llm": {"table": report.ratio_table(PEER_RUNS, stack="ray-serve-llm")},
            "other": {"unavailable": "no such thing"},
        },
    )
    sections = report.markdown(results).split("## Peer: ")
    assert len(sections) == 3
    assert sections[1].startswith("Ray Serve LLM")
    assert "| text | 8 | 0.50 | 0.50 |" in sections[1]
    assert "It could not run here: no such thing" in sections[2]


def test_a_stream_whose_first_token_comes_at_the_end_counts_as_one_piece():
    # (ttft, latency, output tokens) as vLLM's load generator records them per request
    requests = [
        (0.02, 0.30, 64),  # streamed
        (0.29, 0.30, 64),  # every chunk at the end
        (0.25, 0.30, 64),  # late first token, but later chunks still streamed
        (0.10, 0.10, 1),  # too short to tell
        (0.0, 0.0, 0),  # failed
    ]
    ttfts, latencies, output_lens = (list(column) for column in zip(*requests, strict=True))
    assert report.one_piece_share(ttfts, latencies, output_lens) == pytest.approx(1 / 3, abs=1e-4)
    assert report.one_piece_share(ttfts[3:], latencies[3:], output_lens[3:]) is None


def test_the_one_piece_share_is_shown_per_stack_and_its_worst_is_in_the_summary():
    runs = [
        {**run, "one_piece_share": share}
        for run, share in zip(RUNS, (0.0, 0.0, 0.5, 0.0, 0.25, 0.0, None, 0.0), strict=True)
    ]
    rows = {(row["workload"], row["concurrency"]): row for row in report.ratio_table(runs)}
    assert rows["text", 8]["one_piece_share"] == {"ours": 0.5, "vllm": 0.0}
    assert rows["image-repeat", 8]["one_piece_share"] == {"ours": None, "vllm": 0.0}
    assert report.summary(runs)["one_piece_share_max"] == 0.5
    assert report.summary(RUNS)["one_piece_share_max"] is None  # results from before the metric
    table = "\n".join(report._table_lines(report.ratio_table(runs)))
    assert "| 0.50 / 0.00 |" in table and "| - / 0.00 |" in table
