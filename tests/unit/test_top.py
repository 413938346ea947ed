"""`ministral-serve top`'s arithmetic, on readings written out by hand."""

import pytest

from serve.metrics import TIME_TO_FIRST_TOKEN
from serve.top import WATCHED, Reading, Window, quantile, rates, render, tenant_rows, view


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


# Three tenants over 10 s on two ingress replicas (i1, i2). acme: 20 answers (18 x 200, one 429,
# one 500), 3000 prompt + 1000 image tokens, 5000 completion tokens; i2 restarted between the
# readings, so its counters count from zero. globex: 5 answers, all 200, fewer completion tokens,
# and its first rejections (the counter is absent until the first). idle: only in flight.
TENANTS_BEFORE_TEXT = """
ray_ministral_tenant_requests_total{model="m",tenant="acme",status="200",error_code="",replica="i1"} 100
ray_ministral_tenant_requests_total{model="m",tenant="acme",status="200",error_code="",replica="i2"} 50
ray_ministral_tenant_requests_total{model="m",tenant="acme",status="429",error_code="quota",replica="i1"} 4
ray_ministral_tenant_requests_total{model="m",tenant="globex",status="200",error_code="",replica="i1"} 30
ray_ministral_tenant_prompt_tokens_total{model="m",tenant="acme",replica="i1"} 10000
ray_ministral_tenant_prompt_tokens_total{model="m",tenant="acme",replica="i2"} 9000
ray_ministral_tenant_image_tokens_total{model="m",tenant="acme",replica="i1"} 2000
ray_ministral_tenant_completion_tokens_total{model="m",tenant="acme",replica="i1"} 40000
ray_ministral_tenant_completion_tokens_total{model="m",tenant="acme",replica="i2"} 30000
ray_ministral_tenant_completion_tokens_total{model="m",tenant="globex",replica="i1"} 7000
ray_ministral_tenant_prompt_tokens_total{model="m",tenant="globex",replica="i1"} 500
"""
TENANTS_AFTER_TEXT = """
ray_ministral_tenant_requests_total{model="m",tenant="acme",status="200",error_code="",replica="i1"} 110
ray_ministral_tenant_requests_total{model="m",tenant="acme",status="200",error_code="",replica="i2"} 8
ray_ministral_tenant_requests_total{model="m",tenant="acme",status="429",error_code="quota",replica="i1"} 5
ray_ministral_tenant_requests_total{model="m",tenant="acme",status="500",error_code="internal",replica="i2"} 1
ray_ministral_tenant_requests_total{model="m",tenant="globex",status="200",error_code="",replica="i1"} 35
ray_ministral_tenant_prompt_tokens_total{model="m",tenant="acme",replica="i1"} 12000
ray_ministral_tenant_prompt_tokens_total{model="m",tenant="acme",replica="i2"} 1000
ray_ministral_tenant_image_tokens_total{model="m",tenant="acme",replica="i1"} 3000
ray_ministral_tenant_completion_tokens_total{model="m",tenant="acme",replica="i1"} 43000
ray_ministral_tenant_completion_tokens_total{model="m",tenant="acme",replica="i2"} 2000
ray_ministral_tenant_completion_tokens_total{model="m",tenant="globex",replica="i1"} 8000
ray_ministral_tenant_prompt_tokens_total{model="m",tenant="globex",replica="i1"} 700
ray_ministral_tenant_rejections_total{model="m",tenant="globex",reason="requests_per_minute",replica="i1"} 3
ray_ministral_tenant_rejections_total{model="m",tenant="globex",reason="queue_full",replica="i2"} 1
ray_ministral_tenant_requests_in_flight{model="m",tenant="acme",replica="i1"} 3
ray_ministral_tenant_requests_in_flight{model="m",tenant="acme",replica="i2"} 4
ray_ministral_tenant_requests_in_flight{model="m",tenant="globex",replica="i1"} 1
ray_ministral_tenant_requests_in_flight{model="m",tenant="idle",replica="i2"} 2
"""
TENANTS_BEFORE = reading(200.0, TENANTS_BEFORE_TEXT)
TENANTS_AFTER = reading(210.0, TENANTS_AFTER_TEXT)


def test_each_tenant_gets_its_rates_error_share_in_flight_and_rejections():
    rows = {row.tenant: row for row in tenant_rows(TENANTS_BEFORE, TENANTS_AFTER)}
    acme, globex, idle = rows["acme"], rows["globex"], rows["idle"]
    # 10 (i1) + 8 (i2 restarted) + 1 (429) + 1 (500, new) answers in 10 s; 2 of 20 not 2xx.
    assert acme.requests_per_s == pytest.approx(2.0)
    assert acme.error_share == pytest.approx(0.1)
    # Prompt 2000 + 1000 (i2 from zero), image 1000: 4000 in 10 s.
    assert acme.prompt_tokens_per_s == pytest.approx(400.0)
    # 3000 (i1) + 2000 (i2 from zero).
    assert acme.completion_tokens_per_s == pytest.approx(500.0)
    assert acme.in_flight == 7
    assert acme.rejections_per_s == 0.0
    assert globex.requests_per_s == pytest.approx(0.5)
    assert globex.error_share == 0.0
    assert globex.prompt_tokens_per_s == pytest.approx(20.0)
    assert globex.completion_tokens_per_s == pytest.approx(100.0)
    assert globex.in_flight == 1
    # Both reasons, both replicas; the counters first appeared within the window.
    assert globex.rejections_per_s == pytest.approx(0.4)
    # No answers in the window: no share to show, rather than 0% errors.
    assert (idle.requests_per_s, idle.error_share, idle.in_flight) == (0.0, None, 2)


def test_tenants_are_sorted_by_completion_tokens_per_second_busiest_first():
    assert [row.tenant for row in tenant_rows(TENANTS_BEFORE, TENANTS_AFTER)] == ["acme", "globex", "idle"]
    # Swap the two busy tenants' completion counters: the order follows.
    swapped = TENANTS_AFTER_TEXT.replace('"acme",replica="i1"} 43000', '"acme",replica="i1"} 40000')
    swapped = swapped.replace('"globex",replica="i1"} 8000', '"globex",replica="i1"} 17000')
    rows = tenant_rows(TENANTS_BEFORE, reading(210.0, swapped))
    assert [row.tenant for row in rows] == ["globex", "acme", "idle"]
    assert [row.completion_tokens_per_s for row in rows] == [
        pytest.approx(1000.0),
        pytest.approx(200.0),
        0.0,
    ]


def test_the_view_and_the_watched_series_carry_the_tenants():
    before = Reading.parse(BEFORE_TEXT + TENANTS_BEFORE_TEXT, 200.0, WATCHED)
    after = Reading.parse(AFTER_TEXT + TENANTS_AFTER_TEXT, 210.0, WATCHED)
    assert view(before, after).tenants == tenant_rows(TENANTS_BEFORE, TENANTS_AFTER)
    # The readings without tenant series (no tenants file, an older service): no rows.
    assert view(BEFORE, AFTER).tenants == []


def test_the_tenants_table_shows_each_tenant_in_order():
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(render(view(TENANTS_BEFORE, TENANTS_AFTER), "http://metrics"))
    text = console.export_text()
    cells = [line.replace("│", " ").split() for line in text[text.index("Tenants") :].splitlines()]
    rows = [line for line in cells if line and line[0] in ("acme", "globex", "idle")]
    assert rows == [
        ["acme", "2.00", "10.0%", "400.0", "500.0", "7", "0.00"],
        ["globex", "0.50", "0.0%", "20.0", "100.0", "1", "0.40"],
        ["idle", "0.00", "-", "0.0", "0.0", "2", "0.00"],
    ]
