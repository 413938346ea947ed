"""Autoscaling policies of the stages: pure functions of their inputs, and the callables Serve runs.

Each stage scales on the signals that say it is short of capacity:

- decoder: requests waiting in vLLM's queue and KV-cache use (a decoder at
  its batch limit or out of KV cache makes requests wait, however few are
  ongoing), and ongoing requests, so that it does not shrink while busy;
- encoder: images waiting to be encoded;
- preprocess: ongoing requests (its work is per request).

A signal's load is its average per replica over Serve's look-back window,
divided by its target per replica; the stage wants
`ceil(current x the largest load)` replicas, as Serve's default policy does
for ongoing requests, counting the replicas that are running. A change from
the count Serve is aiming for is made only when it has been wanted for the
whole of its delay (`upscale_delay_s`, `downscale_delay_s`): one busy moment
does not start a replica, and one quiet one does not stop it. The result is
always within [min_replicas, max_replicas]. Without any reported signal
(replicas starting, stats lost) the policy holds the current count.

The replicas report their signals through `record_autoscaling_stats`
(`AUTOSCALING_SIGNALS` names them); Serve's own count of ongoing requests is
`ONGOING`. This module imports nothing of Ray: Serve calls `StagePolicy`
with its `AutoscalingContext`, read by attribute.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ONGOING = "ongoing_requests"
WAITING = "waiting_requests"
KV_CACHE_USAGE = "kv_cache_usage"
PENDING_IMAGES = "pending_images"
# What each stage's replicas report through record_autoscaling_stats.
AUTOSCALING_SIGNALS = {"decoder": (WAITING, KV_CACHE_USAGE), "encoder": (PENDING_IMAGES,), "preprocess": ()}


@dataclass(frozen=True)
class Decision:
    replicas: int
    # When the current wish for more (fewer) replicas began; None while there is none.
    up_since: float | None = None
    down_since: float | None = None


def wanted_replicas(
    current: int, per_replica: Mapping[str, float], targets: Mapping[str, float]
) -> int | None:
    """Replicas for every signal to be at or under its target; None without any signal."""
    loads = [per_replica[name] / target for name, target in targets.items() if name in per_replica]
    if not loads:
        return None
    return math.ceil(max(1, current) * max(loads))


def decide(
    target: int,
    running: int,
    per_replica: Mapping[str, float],
    targets: Mapping[str, float],
    *,
    min_replicas: int,
    max_replicas: int,
    upscale_delay_s: float,
    downscale_delay_s: float,
    now: float,
    previous: Decision | None = None,
) -> Decision:
    """The replica count to aim for now. `target`: the count Serve is aiming for (replicas may
    still be starting); `running`: the replicas whose signals `per_replica` averages."""
    previous = previous or Decision(target)
    wanted = wanted_replicas(running, per_replica, targets)
    if wanted is None:
        return Decision(min(max(target, min_replicas), max_replicas))
    wanted = min(max(wanted, min_replicas), max_replicas)
    if target < min_replicas or target > max_replicas:
        return Decision(wanted)
    if wanted > target:
        since = previous.up_since if previous.up_since is not None else now
        if now - since >= upscale_delay_s:
            return Decision(wanted)
        return Decision(target, up_since=since)
    if wanted < target:
        since = previous.down_since if previous.down_since is not None else now
        if now - since >= downscale_delay_s:
            return Decision(wanted)
        return Decision(target, down_since=since)
    return Decision(target)


def averages(metrics: Mapping[str, Mapping[Any, float]] | None, replicas: list) -> dict[str, float]:
    """Each signal's average over the running replicas that reported it.

    A replica that has not reported (just started) is left out of the
    average rather than counted as idle; one that is gone is not a running
    replica and is ignored."""
    running = set(replicas)
    result = {}
    for name, by_replica in (metrics or {}).items():
        values = [value for replica, value in by_replica.items() if replica in running]
        if values:
            result[name] = sum(values) / len(values)
    return result


class StagePolicy:
    """Serve's `AutoscalingConfig.policy`: `policy_function: autoscaling.policies:StagePolicy`,
    `policy_kwargs` the targets and delays (serve/config.py writes them)."""

    def __init__(self, targets: dict[str, float], upscale_delay_s: float, downscale_delay_s: float):
        self.targets = targets
        self.upscale_delay_s = upscale_delay_s
        self.downscale_delay_s = downscale_delay_s

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        # Serve's current_num_replicas counts the running replicas; target_num_replicas is the
        # count it is heading for (a replica being started counts there, not here).
        per_replica = averages(ctx.aggregated_metrics, ctx.running_replicas)
        if ONGOING in self.targets and ctx.current_num_replicas > 0:
            per_replica[ONGOING] = ctx.total_num_requests / ctx.current_num_replicas
        state = ctx.policy_state or {}
        decision = decide(
            ctx.target_num_replicas,
            ctx.current_num_replicas,
            per_replica,
            self.targets,
            min_replicas=ctx.capacity_adjusted_min_replicas,
            max_replicas=ctx.capacity_adjusted_max_replicas,
            upscale_delay_s=self.upscale_delay_s,
            downscale_delay_s=self.downscale_delay_s,
            now=ctx.current_time if ctx.current_time is not None else time.time(),
            previous=Decision(ctx.current_num_replicas, state.get("up_since"), state.get("down_since")),
        )
        return decision.replicas, {"up_since": decision.up_since, "down_since": decision.down_since}
