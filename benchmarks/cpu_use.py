"""CPU seconds a stack spends, per process group, read from the processes' own counters (psutil).

Every process a benchmark server starts carries its environment mark
(`benchmarks.stacks.Server.process_mark`), Ray workers and vLLM's engine
processes included. `CpuMeter` reads their user + system CPU time before and
after a measurement and sums the difference per group. The group of a
process comes from its title: Ray names a replica's worker
`ray::ServeReplica:APP:DEPLOYMENT`, its proxy `ray::ProxyActor`, and vLLM
names its engine processes `VLLM::EngineCore`, `VLLM::Worker...`.

The load generator runs in the benchmark's own process, unmarked, so it is
never counted. A process that exits during a measurement loses what it used
since the first reading; the meter counts such exits.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import psutil

from benchmarks.stacks import marked_processes

# The model and its scheduler: what a serving layer's cost is measured apart from.
ENGINE = "engine"
# Ray's own processes (GCS, raylet, Serve controller, agents) and a stack's launcher.
RUNTIME = "ray and launcher"
# Serve deployments, by name, and the group each is counted in.
DEPLOYMENT_GROUPS = {
    "Ingress": "ingress",
    "Preprocess": "preprocess",
    "Encoder": "encoder",
    "Decoder": "decoder",
    # Ray Serve LLM's deployments (`ray.serve.llm.build_openai_app`).
    "OpenAiIngress": "ingress",
    "LLMRouter": "ingress",
    "LLMServer": "server",
}


def process_group(title: str, name: str = "") -> str:
    """The group a process of a benchmarked stack belongs to, from its title (its first argument
    as `ps` shows it, or its whole command line) and its name (`/proc/PID/comm`, 15 characters).

    setproctitle sets both; where it cannot rewrite the command line, only the name shows the
    title, and a spawned vLLM engine process keeps `python -c "from multiprocessing.spawn ..."`."""
    if title.startswith("VLLM::") or "EngineCore" in title or name.startswith("VLLM::"):
        return ENGINE
    if title.startswith(("ray::ProxyActor", "ray::HAProxyManager")):
        return "proxy"
    if title.startswith("ray::ServeReplica:"):
        # ray::ServeReplica:APP:DEPLOYMENT, where Ray Serve LLM's server deployment is LLMServer:MODEL.
        deployment = title.split()[0].split(":", 4)[-1].split(":")[0].split(".")[0]
        return DEPLOYMENT_GROUPS.get(deployment, deployment.lower())
    if "vllm.entrypoints.openai.api_server" in title:
        return "api server"
    if title.startswith("haproxy") or "/haproxy " in title:
        return "proxy"
    return RUNTIME


# The groups whose processes start the engine: what they spawn is the engine's.
ENGINE_PARENTS = frozenset({"decoder", "server", "api server"})


def group_with_ancestors(title: str, name: str, ancestor_titles: list[str]) -> str:
    """`process_group`, but a process it cannot place that a decoder or a server started is the
    engine's: a spawned engine process whose title setproctitle did not rewrite (CI saw one keep
    `python -c from multiprocessing.spawn ...` and `python` as its name) is still the engine."""
    group = process_group(title, name)
    if group == RUNTIME and any(process_group(ancestor) in ENGINE_PARENTS for ancestor in ancestor_titles):
        return ENGINE
    return group


def serving_cpu_s(cpu_s: dict[str, float]) -> float:
    """CPU seconds of every group but the engine's."""
    return sum(seconds for group, seconds in cpu_s.items() if group != ENGINE)


def per_1k_tokens(cpu_s: float, output_tokens: int) -> float | None:
    """CPU seconds per 1,000 output tokens; None when nothing was generated."""
    if not output_tokens:
        return None
    return round(cpu_s * 1000 / output_tokens, 4)


@dataclass
class CpuMeter:
    """CPU seconds per group of the processes marked `mark`, between `start` and `stop`."""

    mark: str
    _first: dict[int, tuple[str, float]] = field(default_factory=dict)
    exited: int = 0

    def start(self) -> None:
        self._first = _readings(self.mark)
        self.exited = 0

    def stop(self) -> dict[str, float]:
        last = _readings(self.mark)
        self.exited = len(self._first.keys() - last.keys())
        cpu_s: dict[str, float] = {}
        for pid, (group, seconds) in last.items():
            # A process that started during the measurement counts from 0.
            before = self._first.get(pid, (group, 0.0))[1]
            cpu_s[group] = cpu_s.get(group, 0.0) + max(0.0, seconds - before)
        return {group: round(seconds, 3) for group, seconds in sorted(cpu_s.items())}


def _readings(mark: str) -> dict[int, tuple[str, float]]:
    readings = {}
    for pid in marked_processes(mark):
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            with process.oneshot():
                times = process.cpu_times()
                name = process.name()
                title = " ".join(process.cmdline()) or name
            ancestors = [" ".join(parent.cmdline()) or parent.name() for parent in process.parents()]
            readings[pid] = (group_with_ancestors(title, name, ancestors), times.user + times.system)
    return readings
