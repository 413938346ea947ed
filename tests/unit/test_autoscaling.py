"""The stages' autoscaling policies (autoscaling/policies.py), without a running Ray."""

from __future__ import annotations

import pytest

from autoscaling.policies import (
    KV_CACHE_USAGE,
    ONGOING,
    PENDING_IMAGES,
    WAITING,
    Decision,
    StagePolicy,
    averages,
    decide,
    wanted_replicas,
)
from serve.config import AppConfig, AutoscalingBounds

TARGETS = {WAITING: 2.0, KV_CACHE_USAGE: 0.8, ONGOING: 16.0}
BOUNDS = {"min_replicas": 1, "max_replicas": 4, "upscale_delay_s": 30.0, "downscale_delay_s": 300.0}


def run(current: int, samples: list[tuple[float, dict[str, float]]]) -> list[int]:
    """The replica count after each (time, signals) sample, as Serve would apply it."""
    decision = None
    counts = []
    for now, signals in samples:
        decision = decide(current, current, signals, TARGETS, now=now, previous=decision, **BOUNDS)
        current = decision.replicas
        counts.append(current)
    return counts


@pytest.mark.parametrize(
    ("current", "signals", "expected"),
    [
        pytest.param(2, {}, None, id="no-signal"),
        pytest.param(2, {WAITING: 2.0, KV_CACHE_USAGE: 0.4, ONGOING: 8}, 2, id="at-target"),
        pytest.param(2, {WAITING: 5.0, KV_CACHE_USAGE: 0.4, ONGOING: 8}, 5, id="waiting-decides"),
        pytest.param(1, {WAITING: 0.0, KV_CACHE_USAGE: 0.95, ONGOING: 4}, 2, id="kv-decides"),
        pytest.param(4, {WAITING: 0.0, KV_CACHE_USAGE: 0.1, ONGOING: 1}, 1, id="idle"),
        pytest.param(2, {KV_CACHE_USAGE: 0.8}, 2, id="only-some-signals"),
        pytest.param(0, {ONGOING: 3}, 1, id="from-zero"),
    ],
)
def test_wanted_replicas(current, signals, expected):
    assert wanted_replicas(current, signals, TARGETS) == expected


def test_sustained_load_scales_up_after_the_delay():
    busy = {WAITING: 6.0}
    assert run(1, [(0, busy), (10, busy), (29, busy), (30, busy)]) == [1, 1, 1, 3]


def test_a_blip_does_not_scale_up():
    busy, quiet = {WAITING: 6.0}, {WAITING: 2.0}
    assert run(1, [(0, busy), (20, quiet), (25, busy), (50, busy), (55, busy)]) == [1, 1, 1, 1, 3]


def test_scales_down_only_after_the_downscale_delay():
    idle = {WAITING: 0.0, KV_CACHE_USAGE: 0.0, ONGOING: 0.0}
    assert run(3, [(0, idle), (100, idle), (299, idle), (300, idle)]) == [3, 3, 3, 1]


def test_a_busy_moment_restarts_the_downscale_delay():
    idle, busy = {ONGOING: 0.0}, {ONGOING: 40.0}
    assert run(3, [(0, idle), (200, {ONGOING: 16.0}), (250, idle), (540, idle), (550, idle)]) == [
        3,
        3,
        3,
        3,
        1,
    ]
    assert run(3, [(0, idle), (10, busy)]) == [3, 3]


def test_never_beyond_the_bounds():
    assert run(4, [(0, {WAITING: 100.0}), (100, {WAITING: 100.0})]) == [4, 4]
    assert run(1, [(0, {ONGOING: 0.0}), (1000, {ONGOING: 0.0})]) == [1, 1]
    # A count outside the bounds (they were just changed) goes back within them at once.
    assert run(7, [(0, {ONGOING: 16.0})]) == [4]
    assert run(0, [(0, {})]) == [1]


def test_missing_metrics_hold_the_count_and_forget_a_pending_change():
    busy = {WAITING: 6.0}
    assert run(2, [(0, busy), (20, {}), (40, busy), (60, busy)]) == [2, 2, 2, 2]


def test_a_scale_up_under_way_is_held_while_its_replica_starts():
    # Serve aims for 2, one runs and carries the load of two: 4 waiting over a target of 2.
    held = decide(2, 1, {WAITING: 4.0}, TARGETS, now=0, **BOUNDS)
    assert held == Decision(2)
    assert decide(2, 1, {}, TARGETS, now=0, **BOUNDS) == Decision(2)


def test_averages_leave_out_replicas_that_have_not_reported_or_are_gone():
    metrics = {WAITING: {"r1": 4.0, "r2": 2.0, "gone": 100.0}, PENDING_IMAGES: {}}
    assert averages(metrics, ["r1", "r2", "new"]) == {WAITING: 3.0}
    assert averages(None, ["r1"]) == {}


def context(current: int, metrics, total_requests: float, now: float, state=None, target=None):
    """Ray Serve's own AutoscalingContext, as the controller builds it."""
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    deployment = DeploymentID(name="Decoder", app_name="ministral")
    replicas = [ReplicaID(f"r{i}", deployment_id=deployment) for i in range(current)]
    return AutoscalingContext(
        deployment_id=deployment,
        deployment_name="Decoder",
        app_name="ministral",
        current_num_replicas=current,
        target_num_replicas=current if target is None else target,
        running_replicas=replicas,
        total_num_requests=total_requests,
        total_queued_requests=0,
        aggregated_metrics={
            name: dict(zip(replicas, values, strict=False)) for name, values in metrics.items()
        },
        raw_metrics={},
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=4,
        policy_state=state or {},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=now,
        config=AutoscalingConfig(min_replicas=1, max_replicas=4),
    )


def test_the_policy_reads_serves_context_and_keeps_its_state_between_calls():
    policy = StagePolicy(TARGETS, upscale_delay_s=30, downscale_delay_s=300)
    metrics = {WAITING: [5.0, 7.0], KV_CACHE_USAGE: [0.2, 0.3]}
    replicas, state = policy(context(2, metrics, total_requests=10, now=100.0))
    assert replicas == 2 and state["up_since"] == 100.0
    replicas, state = policy(context(2, metrics, total_requests=10, now=130.0, state=state))
    # 6 waiting per replica over a target of 2 wants three times as many: 6, within max_replicas 4.
    assert replicas == 4
    assert state == {"up_since": None, "down_since": None}


def test_the_policy_holds_serves_target_while_a_replica_starts():
    policy = StagePolicy({ONGOING: 16.0}, upscale_delay_s=0, downscale_delay_s=60)
    # Two wanted, one running with 20 ongoing: not a reason to go back to one.
    replicas, _ = policy(context(1, {}, total_requests=20, now=0.0, target=2))
    assert replicas == 2


def test_ongoing_requests_come_from_serves_count():
    policy = StagePolicy({ONGOING: 16.0}, upscale_delay_s=0, downscale_delay_s=0)
    replicas, _ = policy(context(1, {}, total_requests=40, now=0.0))
    assert replicas == 3


def test_the_config_writes_a_policy_serve_accepts():
    from ray.serve._private.autoscaling_state import _resolve_policy_callable
    from ray.serve.config import AutoscalingConfig

    config = AppConfig.model_validate(
        {"deployments": {"decoder": {"num_replicas": None, "autoscaling": {"max_replicas": 3}}}}
    )
    options = config.deployments.decoder.serve_options("decoder")
    autoscaling = AutoscalingConfig(**options["autoscaling_config"])
    # As Serve's controller makes it: the class, instantiated with policy_kwargs.
    policy = _resolve_policy_callable(autoscaling.policy)
    assert isinstance(policy, StagePolicy)
    assert policy.targets == AutoscalingBounds(max_replicas=3).targets("decoder")
    assert set(policy.targets) == {WAITING, KV_CACHE_USAGE, ONGOING}
    # Our policy applies the delays; Serve's own are off so that they do not add up.
    assert (autoscaling.upscale_delay_s, autoscaling.downscale_delay_s) == (0, 0)
    assert (policy.upscale_delay_s, policy.downscale_delay_s) == (30, 300)
    assert AutoscalingBounds().targets("encoder") == {PENDING_IMAGES: 8}
    assert AutoscalingBounds().targets("preprocess") == {ONGOING: 16}


def test_a_count_at_max_replicas_waits_out_the_downscale_delay_too():
    idle = {WAITING: 0.0, KV_CACHE_USAGE: 0.0, ONGOING: 0.0}
    at_max = BOUNDS["max_replicas"]
    assert run(at_max, [(0, idle), (299, idle), (300, idle)]) == [at_max, at_max, BOUNDS["min_replicas"]]


def test_ongoing_requests_are_averaged_over_the_running_replicas():
    policy = StagePolicy({ONGOING: 10.0}, upscale_delay_s=0, downscale_delay_s=0)
    # 30 ongoing over 2 replicas is 15 each, 1.5 times the target of 10: 3 replicas.
    replicas, _ = policy(context(2, {}, total_requests=30, now=0.0))
    assert replicas == 3


def test_a_stage_with_no_running_replica_goes_to_its_minimum():
    policy = StagePolicy({ONGOING: 16.0}, upscale_delay_s=0, downscale_delay_s=0)
    replicas, _ = policy(context(0, {}, total_requests=5, now=0.0))
    assert replicas == 1


def test_the_policy_scales_down_after_the_delay_it_remembers_between_calls():
    policy = StagePolicy({WAITING: 2.0}, upscale_delay_s=30, downscale_delay_s=300)
    idle = {WAITING: [0.0, 0.0, 0.0]}
    replicas, state = policy(context(3, idle, total_requests=0, now=1000.0))
    assert (replicas, state["down_since"]) == (3, 1000.0)
    replicas, state = policy(context(3, idle, total_requests=0, now=1299.0, state=state))
    assert (replicas, state["down_since"]) == (3, 1000.0)
    replicas, state = policy(context(3, idle, total_requests=0, now=1300.0, state=state))
    assert replicas == 1


def test_without_serves_clock_the_policy_uses_the_wall_clock():
    import time

    policy = StagePolicy({WAITING: 2.0}, upscale_delay_s=30, downscale_delay_s=300)
    before = time.time()
    replicas, state = policy(context(2, {WAITING: [6.0, 6.0]}, total_requests=0, now=None))
    assert replicas == 2
    assert before <= state["up_since"] <= time.time()
