"""`ministral-serve top`'s arithmetic, on readings written out by hand."""

import pytest

from serve.metrics import TIME_TO_FIRST_TOKEN
from serve.top import WATCHED, Reading, Window, quantile, rates, view


def reading(taken_at: float, text: str) -> Reading:
    return Reading.parse(text, taken_at)


BEFORE_TEXT = """
ray_ministral_generation_tokens_total{replica="i1",route="/v1/chat/completions"} 1000
ray_ministral_generation_tokens_total{replica="i2",route="/v1/chat/completions"} 500
ray_ministral_requests_total{route="/v1/chat/completions",status="200",error_code=""} 10
ray_ministral_time_to_first_token_seconds_bucket{le="0.1"} 4
ray_ministral_time_to_first_token_seconds_bucket{le="0.5"} 8
ray_ministral_time_to_first_token_seconds_bucket{le="+Inf"} 10
ray_vllm_generation_tokens_total{ReplicaId="d1"} 900
ray_vllm_generation_tokens_total{ReplicaId="d2"} 600
"""
AFTER_TEXT = """
ray_ministral_generation_tokens_total{replica="i1",route="/v1/chat/completions"} 1200
ray_ministral_generation_tokens_total{replica="i2",route="/v1/chat/completions"} 40
ray_ministral_requests_total{route="/v1/chat/completions",status="200",error_code=""} 18
ray_ministral_requests_in_flight{replica="i1"} 3
ray_ministral_requests_in_flight{replica="i2"} 2
ray_ministral_time_to_first_token_seconds_bucket{le="0.1"} 4
ray_ministral_time_to_first_token_seconds_bucket{le="0.5"} 16
ray_ministral_time_to_first_token_seconds_bucket{le="+Inf"} 20
ray_serve_deployment_replica_healthy{deployment="Decoder",replica="d1"} 1
ray_serve_deployment_replica_healthy{deployment="Decoder",replica="d2"} 1
ray_serve_deployment_replica_healthy{deployment="Ingress",replica="i1"} 1
ray_serve_replica_processing_queries{deployment="Decoder",replica="d1"} 2
ray_serve_deployment_queued_queries{deployment="Decoder",handle="h"} 7
ray_vllm_generation_tokens_total{ReplicaId="d1"} 1100
ray_vllm_generation_tokens_total{ReplicaId="d2"} 640
ray_vllm_num_requests_running{ReplicaId="d1"} 3
ray_vllm_num_requests_running{ReplicaId="d2"} 1
ray_vllm_num_requests_waiting{ReplicaId="d1"} 2
ray_vllm_kv_cache_usage_perc{ReplicaId="d1"} 0.25
"""
BEFORE = reading(100.0, BEFORE_TEXT)
AFTER = reading(104.0, AFTER_TEXT)


def test_rates_are_increases_per_second_and_a_reset_counts_from_zero():
    by_replica = rates(BEFORE, AFTER, "ray_ministral_generation_tokens_total", by="replica")
    # i1: +200 in 4 s; i2 restarted (500 -> 40): its 40 are new.
    assert by_replica == {"i1": pytest.approx(50.0), "i2": pytest.approx(10.0)}


def test_quantiles_interpolate_within_the_bucket_as_prometheus_does():
    # Between the readings: 0 below 0.1 s, 8 in (0.1, 0.5], 2 above. Median: rank 5 of 10,
    # the 5th of the 8 in (0.1, 0.5]: 0.1 + 0.4 * 5/8. p95: rank 9.5 is past 0.5, in +Inf,
    # where Prometheus answers the highest finite bound.
    assert quantile(BEFORE, AFTER, TIME_TO_FIRST_TOKEN, 0.5) == pytest.approx(0.35)
    assert quantile(BEFORE, AFTER, TIME_TO_FIRST_TOKEN, 0.95) == pytest.approx(0.5)
    assert quantile(BEFORE, BEFORE, TIME_TO_FIRST_TOKEN, 0.5) is None


def test_the_view_has_the_service_each_stage_and_each_decoder_replica():
    current = view(BEFORE, AFTER)
    assert current.service.requests_per_s == pytest.approx(2.0)
    assert current.service.generated_tokens_per_s == pytest.approx(60.0)
    assert current.service.in_flight == 5
    assert [(s.stage, s.replicas, s.in_progress, s.queued) for s in current.stages] == [
        ("Decoder", 2, 2, 7),
        ("Ingress", 1, 0, 0),
    ]
    assert [
        (r.replica, r.generated_tokens_per_s, r.running, r.waiting, r.kv_cache_use)
        for r in current.decoder_replicas
    ] == [
        ("d1", pytest.approx(50.0), 3, 2, 0.25),
        ("d2", pytest.approx(10.0), 1, 0, 0.0),
    ]


def test_the_window_spans_at_least_its_length_once_it_can_and_no_more_than_needed():
    window = Window(span_s=10.0)
    for taken_at in (0.0, 4.0, 8.0):
        window.add(Reading(taken_at))
    # Not 10 s of readings yet: the oldest one stays.
    assert [r.taken_at for r in window.ends] == [0.0, 8.0]
    window.add(Reading(12.0))
    # 4.0 would cover only 8 s; 0.0 is kept.
    assert [r.taken_at for r in window.ends] == [0.0, 12.0]
    window.add(Reading(15.0))
    # 4.0 now covers 11 s, so 0.0 goes.
    assert [r.taken_at for r in window.ends] == [4.0, 15.0]
    window.add(Reading(40.0))
    # A long gap: the newest of the older readings still spans the window.
    assert [r.taken_at for r in window.ends] == [15.0, 40.0]


def test_parsing_only_the_watched_series_changes_nothing_top_shows():
    ray_own = """
# HELP ray_tasks Current number of tasks.
# TYPE ray_tasks gauge
ray_tasks{State="RUNNING"} 4
ray_grpc_server_req_process_time_ms_bucket{le="10"} 3
"""
    before = Reading.parse(BEFORE_TEXT + ray_own, 100.0, WATCHED)
    after = Reading.parse(ray_own + AFTER_TEXT, 104.0, WATCHED)
    assert "ray_tasks" not in after.samples
    assert "ray_grpc_server_req_process_time_ms_bucket" not in after.samples
    assert view(before, after) == view(BEFORE, AFTER)
