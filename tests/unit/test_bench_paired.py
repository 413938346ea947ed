"""The paired-run tool's own logic: variant configs, alternating order, medians (no servers)."""

from __future__ import annotations

import pytest

from benchmarks.paired import Variant, VariantService, medians, merged, variant_order
from serve.config import AppConfig


def test_a_variant_overrides_nested_settings_and_keeps_the_rest():
    base = {"engine": {"max_num_seqs": 64, "dtype": "bfloat16"}, "streaming": {"interval_ms": 50}}
    config = merged(base, {"engine": {"export_metrics": False}})
    assert config == {
        "engine": {"max_num_seqs": 64, "dtype": "bfloat16", "export_metrics": False},
        "streaming": {"interval_ms": 50},
    }
    assert base["engine"] == {"max_num_seqs": 64, "dtype": "bfloat16"}  # not changed in place
    assert AppConfig.model_validate(config).engine.export_metrics is False


def test_variants_alternate_so_that_none_always_runs_first():
    variants = [Variant("a"), Variant("b"), Variant("c")]
    firsts = [variant_order(variants, round_index)[0].name for round_index in range(4)]
    assert firsts == ["a", "c", "a", "c"]
    assert all(sorted(v.name for v in variant_order(variants, r)) == ["a", "b", "c"] for r in range(4))


def test_a_variant_adds_its_arguments_and_environment(tmp_path):
    variant = Variant("proxy", env={"X": "1"}, args=("--front-door", "serve-proxy"))
    service = VariantService(variant, AppConfig(), 8999, tmp_path / "log")
    assert service.command()[-2:] == ["--front-door", "serve-proxy"]
    assert service.environment()["X"] == "1"
    assert service.key == "proxy"


def test_medians_are_per_variant_and_concurrency():
    def run(stack, concurrency, tps):
        return {
            "workload": "text",
            "stack": stack,
            "concurrency": concurrency,
            "failed": 0,
            "output_throughput": tps,
            "median_ttft_ms": tps / 10,
            "median_tpot_ms": 1.0,
            "serving_cpu_s_per_1k_tokens": 1000 / tps,
        }

    rows = medians([run("a", 8, 100), run("a", 8, 300), run("a", 8, 200), run("b", 8, 50), run("a", 32, 10)])
    by_key = {(row["variant"], row["concurrency"]): row for row in rows}
    assert by_key["a", 8]["output_throughput"] == 200
    assert by_key["a", 8]["serving_cpu_s_per_1k_tokens"] == pytest.approx(5.0)
    assert by_key["a", 8]["rounds"] == 3
    assert by_key["b", 8]["rounds"] == 1
    assert set(by_key) == {("a", 8), ("b", 8), ("a", 32)}
