"""Waiting for state that changes after a call returns (Ray's bookkeeping, processes exiting)."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(predicate: Callable[[], bool], timeout_s: float = 30.0, interval_s: float = 0.2) -> bool:
    """Whether `predicate` came true within `timeout_s` (asked every `interval_s`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return False
