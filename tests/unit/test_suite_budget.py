"""The suite stops itself past its time budget, with the reason and the slowest tests listed."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def run_pytest(budget_min: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        env={**os.environ, "MINISTRAL_TEST_BUDGET_MIN": budget_min},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_run_past_the_budget_stops_after_the_test_that_crossed_it():
    result = run_pytest("0.0001", "tests/unit/test_import_direction.py")
    assert result.returncode == 2, result.stdout[-2000:]
    assert "1 passed" in result.stdout
    assert "ran past its time budget of 0.0001 minutes" in result.stdout
    assert "slowest 25 durations" in result.stdout


def test_within_the_budget_every_test_runs():
    result = run_pytest("60", "tests/unit/test_import_direction.py")
    assert result.returncode == 0, result.stdout[-2000:]
    assert "time budget" not in result.stdout
    assert "slowest 25 durations" in result.stdout
