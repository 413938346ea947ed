"""/health: every stage must have a running replica, in Serve's own view, asked afresh on each call.

Serve's controller checks each replica itself (its `check_health`, every
`health_check_period_s`) and replaces one that died or fails the check, so
its count of running replicas is the truth, at most one period late. It is
read from the controller rather than by calling the stages: a call would
wait in the stage's queue, so a stage at full load would look dead.
"""

from __future__ import annotations

from collections.abc import Mapping

RUNNING = "RUNNING"


def stage_states(replicas: Mapping[str, Mapping[str, int] | None]) -> dict[str, str]:
    """Each stage's state from its replica counts by state (None: Serve knows no such deployment)."""
    states = {}
    for stage, counts in replicas.items():
        if counts is None:
            states[stage] = "not deployed"
        elif counts.get(RUNNING, 0) > 0:
            states[stage] = "ok"
        else:
            others = ", ".join(f"{n} {state.lower()}" for state, n in sorted(counts.items()) if n) or "none"
            states[stage] = f"no running replica ({others})"
    return states
