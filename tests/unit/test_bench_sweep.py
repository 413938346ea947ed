"""The benchmark's sweep order, with fake stacks and a fake measurement (no servers, no load).

What is under test is the orchestration: one stack up at a time, the order
rotating between repeats, and a stack that cannot start recorded as such.
"""

from __future__ import annotations

import pytest

from benchmarks import runner
from benchmarks.stacks import Server, ServerFailed
from benchmarks.workloads import CPU_DEMO_SHAPE
from serve.config import AppConfig


class FakeStack(Server):
    """Records its starts and stops in a shared journal; fails to start from `fails_from` on."""

    def __init__(self, key: str, journal: list, tmp_path, fails_from: int | None = None):
        super().__init__(0, tmp_path / f"{key}.log")
        self.name = self.key = key
        self.journal = journal
        self.fails_from = fails_from
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        if self.fails_from is not None and self.starts >= self.fails_from:
            raise ServerFailed(f"{self.key} exited with 1:\nboom")
        self.journal.append(("start", self.key))

    def stop(self) -> None:
        self.journal.append(("stop", self.key))


@pytest.fixture
def fake_measure(monkeypatch):
    measured = []

    def measure(settings, workload, stack, concurrency, checkpoint, repeat):
        measured.append((stack.key, workload.name, concurrency, repeat))
        return {"workload": workload.name, "stack": stack.key, "concurrency": concurrency, "repeat": repeat}

    monkeypatch.setattr(runner, "_measure", measure)
    return measured


def _sweep(tmp_path, stacks, repeats=3):
    settings = runner.BenchSettings(
        name="t", config=AppConfig(), workloads=("text",), concurrencies=(1, 4), repeats=repeats
    )
    results = {"workloads": {}, "peers": {}, "runs": []}
    ours, baseline, *peers = stacks
    runner._sweep(settings, CPU_DEMO_SHAPE, ["text"], ours, baseline, None, tmp_path, results, tuple(peers))
    return results


def test_one_stack_at_a_time_and_the_order_rotates(tmp_path, fake_measure):
    journal = []
    stacks = [FakeStack(key, journal, tmp_path) for key in ("ours", "vllm", "ray-serve-llm")]
    results = _sweep(tmp_path, stacks)
    starts = [key for event, key in journal if event == "start"]
    assert starts == [
        "ours",
        "vllm",
        "ray-serve-llm",
        "vllm",
        "ray-serve-llm",
        "ours",
        "ray-serve-llm",
        "ours",
        "vllm",
    ]
    # Every start is followed by that stack's stop before anything else starts.
    assert journal == [event for key in starts for event in (("start", key), ("stop", key))]
    # Each stack, while up, got every level of the repeat.
    assert fake_measure[:2] == [("ours", "text", 1, 0), ("ours", "text", 4, 0)]
    assert len(results["runs"]) == 3 * 3 * 2
    assert results["peers"] == {"ray-serve-llm": {"workloads": ["text"]}}


def test_a_peer_that_cannot_start_is_recorded_and_the_others_go_on(tmp_path, fake_measure):
    journal = []
    ours, vllm = FakeStack("ours", journal, tmp_path), FakeStack("vllm", journal, tmp_path)
    peer = FakeStack("ray-serve-llm", journal, tmp_path, fails_from=2)
    results = _sweep(tmp_path, [ours, vllm, peer])
    assert results["peers"] == {"ray-serve-llm": {"unavailable": "ray-serve-llm exited with 1:"}}
    assert {run["stack"] for run in results["runs"]} == {"ours", "vllm"}  # its first repeat's runs dropped
    assert ours.starts == vllm.starts == 3
    assert peer.starts == 2  # not tried again after it failed


def test_a_baseline_that_cannot_start_leaves_ours_measured_alone(tmp_path, fake_measure):
    journal = []
    stacks = [FakeStack("ours", journal, tmp_path), FakeStack("vllm", journal, tmp_path, fails_from=1)]
    results = _sweep(tmp_path, stacks, repeats=2)
    assert results["workloads"]["text"]["baseline_unavailable"] == "vllm exited with 1:"
    assert [run["stack"] for run in results["runs"]] == ["ours"] * 4


def test_ours_failing_to_start_fails_the_benchmark(tmp_path, fake_measure):
    journal = []
    stacks = [FakeStack("ours", journal, tmp_path, fails_from=1), FakeStack("vllm", journal, tmp_path)]
    with pytest.raises(ServerFailed):
        _sweep(tmp_path, stacks)
