"""A short real benchmark run: the stacks start, vLLM's load generator drives them, the report is whole.

Our service and vLLM's server run the text workload at concurrency 1 and 2,
and our stages around the free stand-in engine the serving ceiling: three
server starts. The image workloads and the Ray Serve LLM peer run in
`make bench`; the report's arithmetic for them (image ratios, a peer's own
table and summary, a peer that fails to start) is the unit tests'
(test_bench_report.py, test_bench_sweep.py). No speed is asserted: only
that the report is complete, consistent with its own runs, and that the
servers are gone afterwards, and that the CPU counted per process group
comes from the processes each stack really runs.
"""

from __future__ import annotations

import json
import socket
import statistics

import pytest
from PIL import Image

from benchmarks.cpu_use import ENGINE
from benchmarks.report import TARGETS
from benchmarks.runner import BenchSettings, run
from benchmarks.workloads import WorkloadShape
from serve.config import AppConfig
from tests.ports import free_port

WORKLOADS = ("text",)
CONCURRENCIES = (1, 2)
CEILING_CONCURRENCY = 4
CEILING_PROMPTS = 8
# One repeat: the order rotating between repeats and their median are the
# unit tests' (test_bench_sweep, test_bench_report), and each further repeat
# here costs two more server starts.
REPEATS = 1
# The stacks start Ray instances of their own: before the suite's shared one starts.
pytestmark = pytest.mark.own_cluster

TINY = WorkloadShape(
    text_input_tokens=32, output_tokens=8, image_width=64, image_height=48, long_prompt_words=50
)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def bench(demo_checkpoint, tmp_path_factory):
    config = AppConfig.model_validate(
        {
            "model": {"source": str(demo_checkpoint)},
            "engine": {"max_model_len": 1024, "cpu_kv_cache_space_gib": 1, "max_num_seqs": 8},
            "use_default_system_prompt": False,
            # Text only here: the image stages would only add two replicas to start.
            "images": {"max_images_per_request": 0},
        }
    )
    settings = BenchSettings(
        name="short",
        config=config,
        workloads=WORKLOADS,
        concurrencies=CONCURRENCIES,
        rounds=1,
        min_prompts=2,
        repeats=REPEATS,
        shape=TINY,
        output_root=tmp_path_factory.mktemp("bench"),
        peers=(),
        ceiling_concurrency=CEILING_CONCURRENCY,
        ceiling_prompts=CEILING_PROMPTS,
        ours_port=free_port(),
        vllm_port=free_port(),
        ceiling_port=free_port(),
    )
    return settings, run(settings)


def test_every_workload_ran_on_every_stack_at_every_concurrency_without_failures(bench):
    settings, results = bench
    runs = {(r["workload"], r["stack"], r["concurrency"], r["repeat"]): r for r in results["runs"]}
    expected = {
        (w, s, c, r)
        for w in WORKLOADS
        for s in ("ours", "vllm")
        for c in CONCURRENCIES
        for r in range(REPEATS)
    }
    assert set(runs) == expected
    assert len(results["runs"]) == len(expected)
    for key, measured in runs.items():
        assert measured["failed"] == 0, (key, measured["first_error"])
        assert measured["completed"] == settings.num_prompts(key[2])
        assert measured["output_throughput"] > 0
        assert measured["median_ttft_ms"] > 0
        # Every request has TINY's 8 output tokens, enough to tell a stream from a lump.
        assert 0 <= measured["one_piece_share"] <= 1


def test_ratios_are_ours_over_vllm_of_the_recorded_runs(bench):
    _, results = bench

    def median_of(workload, stack, concurrency, metric):
        return statistics.median(
            r[metric]
            for r in results["runs"]
            if (r["workload"], r["stack"], r["concurrency"]) == (workload, stack, concurrency)
        )

    assert len(results["table"]) == len(WORKLOADS) * len(CONCURRENCIES)
    for row in results["table"]:
        key = row["workload"], row["concurrency"]
        assert row["repeats"] == {"ours": REPEATS, "vllm": REPEATS}
        assert row["output_throughput_ratio"] == pytest.approx(
            median_of(key[0], "ours", key[1], "output_throughput")
            / median_of(key[0], "vllm", key[1], "output_throughput"),
            rel=1e-3,
        )
        assert row["ttft_p50_overhead_ms"] == pytest.approx(
            median_of(key[0], "ours", key[1], "median_ttft_ms")
            - median_of(key[0], "vllm", key[1], "median_ttft_ms"),
            abs=0.01,
        )


def test_summary_carries_the_headline_figures(bench):
    _, results = bench
    summary = results["summary"]
    top = max(CONCURRENCIES)
    text_top = next(r for r in results["table"] if r["workload"] == "text" and r["concurrency"] == top)
    assert summary["text_output_tps_ratio"] == text_top["output_throughput_ratio"]
    assert isinstance(summary["text_ttft_p50_overhead_ms"], float)
    # No image workload ran: no image figure is made up.
    assert summary["image_repeat_ttft_p50_ratio"] is None
    assert results["peers"] == {}
    assert set(summary["targets_met"]) == set(TARGETS)
    # No peer ran and no image workload: those figures have no value and no verdict.
    for name in ("text_output_tps_ratio_vs_peer_min", "image_repeat_vs_unique_ttft_p50_ratio"):
        assert summary[name] is None
        assert summary["targets_met"][name] is None
    vllm_top = next(r for r in results["runs"] if r["stack"] == "vllm" and r["concurrency"] == top)
    assert summary["engine_speed_output_tps"] == vllm_top["output_throughput"]
    assert summary["failed_requests"] == 0
    shares = [r["one_piece_share"]["ours"] for r in results["table"]]
    assert summary["one_piece_share_max"] == max(shares)


def test_files_on_disk_match_the_results_and_plots_are_images(bench):
    settings, results = bench
    out = settings.output_root / settings.name
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    table = (out / "results.md").read_text()
    ours_table = table.split("## Peer: ")[0]
    for workload in WORKLOADS:
        assert sum(line.startswith(f"| {workload} |") for line in ours_table.splitlines()) == len(
            CONCURRENCIES
        )
        with Image.open(out / f"{workload}.png") as plot:
            assert plot.format == "PNG" and plot.width > 300


def test_cpu_is_counted_per_process_group_of_each_stack(bench):
    settings, results = bench
    for measured in results["runs"]:
        cpu_s = measured["cpu_s"]
        assert cpu_s[ENGINE] > 0, measured
        # The groups each stack really runs: ours behind HAProxy (`ministral-serve run`'s default).
        expected = {"proxy", "ingress", "decoder"} if measured["stack"] == "ours" else {"api server"}
        assert expected <= set(cpu_s), measured
        serving = sum(seconds for group, seconds in cpu_s.items() if group != ENGINE)
        assert measured["serving_cpu_s_per_1k_tokens"] == pytest.approx(
            serving * 1000 / measured["output_tokens"], abs=1e-3
        )
        assert measured["output_tokens"] == settings.num_prompts(measured["concurrency"]) * TINY.output_tokens
    assert "(haproxy)" in (settings.output_root / settings.name / "logs" / "ours.log").read_text()
    rows = {(row["stack"], row["concurrency"]) for row in results["cpu_table"]}
    assert rows == {(stack, c) for stack in ("ours", "vllm") for c in CONCURRENCIES}


def test_serving_ceiling_runs_our_stages_without_an_engine(bench):
    _, results = bench
    ceiling = results["serving_ceiling"]
    assert ceiling["failed"] == 0
    assert ceiling["completed"] == CEILING_PROMPTS
    assert ENGINE not in ceiling["cpu_s"]
    assert {"ingress", "decoder"} <= set(ceiling["cpu_s"])
    tokens = ceiling["completed"] * TINY.output_tokens
    assert ceiling["output_tokens_per_cpu_s"] == pytest.approx(
        tokens / sum(ceiling["cpu_s"].values()), rel=1e-2
    )


def test_servers_are_stopped_afterwards(bench):
    settings, _ = bench
    assert not _listening(settings.ours_port)
    assert not _listening(settings.vllm_port)
    assert not _listening(settings.ceiling_port)
