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
    assert summary["targets_met"]["text_output_tps_ratio"] is True  # 0.95 >= 0.85
    # No peer and no unique-image runs: those targets get no verdict.
    assert summary["targets_met"]["text_output_tps_ratio_vs_peer_min"] is None
    assert summary["targets_met"]["image_repeat_vs_unique_ttft_p50_ratio"] is None
    assert summary["failed_requests"] == 1


def test_a_workload_without_baseline_has_no_ratios_and_no_verdict():
    ours_only = [run for run in RUNS if not (run["workload"] == "image-repeat" and run["stack"] == "vllm")]
    summary = report.summary(ours_only)
    assert summary["image_repeat_ttft_p50_ratio"] is None
    assert summary["image_repeat_ttft_p50_overhead_ms"] is None
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


def _with_cpu(run: dict, output_tokens: int, **cpu_s: float) -> dict:
    """`run` with the CPU figures `runner._measure` adds, worked out by hand here."""
    serving = sum(seconds for group, seconds in cpu_s.items() if group != "engine")
    return {
        **run,
        "output_tokens": output_tokens,
        "cpu_s": cpu_s,
        "serving_cpu_s_per_1k_tokens": serving * 1000 / output_tokens,
        "engine_cpu_s_per_1k_tokens": cpu_s.get("engine", 0.0) * 1000 / output_tokens,
    }


CPU_RUNS = [
    _with_cpu(_run("text", "ours", 1, tps=90, ttft=30), 1000, proxy=1.0, ingress=1.0, engine=5.0),
    _with_cpu(_run("text", "ours", 8, tps=380, ttft=55), 5000, proxy=2.0, ingress=3.0, engine=10.0),
    _with_cpu(_run("text", "vllm", 1, tps=100, ttft=20), 1000, engine=5.0, **{"api server": 0.2}),
    _with_cpu(_run("text", "vllm", 8, tps=400, ttft=50), 3000, engine=9.0, **{"api server": 1.5}),
    _with_cpu(_run("text", "ray-serve-llm", 1, tps=80, ttft=70), 1000, proxy=1.0, server=4.0, engine=5.0),
    _with_cpu(
        _run("text", "ray-serve-llm", 8, tps=200, ttft=250), 5000, proxy=2, ingress=4, server=4, engine=9
    ),
    _run("image-repeat", "ours", 1, tps=100, ttft=40),
    _run("image-unique", "ours", 1, tps=100, ttft=100),
    _run("image-repeat", "ours", 8, tps=100, ttft=90),
    _run("image-unique", "ours", 8, tps=100, ttft=120),
    _run("image-repeat", "ours", 16, tps=100, ttft=90),  # no unique-image run at 16: not compared
]


def test_summary_compares_ours_with_the_peer_on_text_at_every_level():
    summary = report.summary(CPU_RUNS, peer="ray-serve-llm")
    assert summary["text_output_tps_ratio_vs_peer_min"] == pytest.approx(1.125)  # 90/80 and 380/200
    assert summary["text_ttft_p50_ratio_vs_peer_max"] == pytest.approx(30 / 70, abs=1e-4)  # and 55/250
    assert summary["targets_met"]["text_output_tps_ratio_vs_peer_min"] is True  # >= 1.1
    assert summary["targets_met"]["text_ttft_p50_ratio_vs_peer_max"] is True  # <= 0.8


def test_serving_cpu_ratios_count_every_process_but_the_engine_at_the_top_concurrency():
    summary = report.summary(CPU_RUNS, peer="ray-serve-llm")
    # At 8-way: ours (2 + 3) s / 5k tokens = 1.0 s per 1k; the peer (2 + 4 + 4) / 5k = 2.0;
    # vLLM's server 1.5 / 3k = 0.5. The engine's seconds count for nobody.
    assert summary["serving_cpu_per_1k_tokens_ratio_vs_peer"] == pytest.approx(0.5)
    assert summary["serving_cpu_per_1k_tokens_ratio_vs_vllm"] == pytest.approx(2.0)
    assert summary["targets_met"]["serving_cpu_per_1k_tokens_ratio_vs_peer"] is True  # <= 0.5
    # Without the peer the ratio against it has no value, and no verdict.
    alone = report.summary(CPU_RUNS)
    assert alone["serving_cpu_per_1k_tokens_ratio_vs_peer"] is None
    assert alone["targets_met"]["serving_cpu_per_1k_tokens_ratio_vs_peer"] is None


def test_repeat_vs_unique_takes_the_worst_level_both_image_workloads_ran():
    summary = report.summary(CPU_RUNS)
    assert summary["image_repeat_vs_unique_ttft_p50_ratio"] == pytest.approx(0.75)  # 90/120, not 40/100
    assert summary["targets_met"]["image_repeat_vs_unique_ttft_p50_ratio"] is False  # > 0.7


def test_engine_speed_is_vllms_text_tokens_per_s_at_its_top_concurrency():
    assert report.summary(CPU_RUNS)["engine_speed_output_tps"] == 400
    assert report.summary(RUNS[4:])["engine_speed_output_tps"] is None  # no text run


def test_cpu_table_has_per_group_medians_per_1k_tokens():
    repeats = [
        _with_cpu(_run("text", "ours", 4, tps=1, ttft=1), 2000, proxy=1.0, engine=4.0),
        _with_cpu(_run("text", "ours", 4, tps=1, ttft=1), 1000, proxy=3.0, engine=1.0),
        _with_cpu(_run("text", "ours", 4, tps=1, ttft=1), 4000, proxy=4.0, engine=4.0, decoder=2.0),
    ]
    (row,) = report.cpu_table(repeats)
    # proxy: 0.5, 3.0, 1.0 per 1k -> 1.0; engine: 2.0, 1.0, 1.0 -> 1.0; decoder in one repeat: 0.5.
    assert row["by_group"] == {"decoder": 0.5, "engine": 1.0, "proxy": 1.0}
    assert row["serving"] == pytest.approx(1.5)  # medians of 0.5, 3.0, 1.5
    assert row["engine"] == pytest.approx(1.0)


def test_ceiling_divides_tokens_and_requests_by_all_cpu_seconds():
    run = {
        **_with_cpu(
            _run("text", "ours (stand-in engine)", 64, tps=3000, ttft=10), 8192, proxy=2.0, decoder=2.0
        ),
        "completed": 128,
    }
    ceiling = report.ceiling(run)
    assert ceiling["output_tokens_per_cpu_s"] == pytest.approx(2048)
    assert ceiling["requests_per_cpu_s"] == pytest.approx(32)
    assert ceiling["concurrency"] == 64


def test_markdown_and_plot_show_the_cpu_table(tmp_path):
    results = _results(
        CPU_RUNS[:6], {"text": {"description": "random text"}}, cpu_table=report.cpu_table(CPU_RUNS)
    )
    text = report.markdown(results)
    header = next(line for line in text.splitlines() if line.startswith("| stack | workload"))
    assert header.split(" | ")[3:-1] == ["api server", "engine", "ingress", "proxy", "server"]
    assert sum(line.startswith("| Ray Serve LLM | text |") for line in text.splitlines()) == 2
    report.plot_cpu(report.cpu_table(CPU_RUNS), tmp_path / "cpu.png")
    assert (tmp_path / "cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
