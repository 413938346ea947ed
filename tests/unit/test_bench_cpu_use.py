"""Counting a stack's CPU per process group: titles as Ray and vLLM set them, and real processes
read through psutil."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from benchmarks.cpu_use import (
    ENGINE,
    RUNTIME,
    CpuMeter,
    group_with_ancestors,
    per_1k_tokens,
    process_group,
    serving_cpu_s,
)
from benchmarks.stacks import SERVER_MARK


@pytest.mark.parametrize(
    ("title", "group"),
    [
        ("ray::ServeReplica:ministral:Ingress", "ingress"),
        ("ray::ServeReplica:ministral:Decoder.initialize_and_get_metadata", "decoder"),  # during a call
        ("ray::ServeReplica:ministral:Decoder", "decoder"),
        ("ray::ServeReplica:ministral:Encoder", "encoder"),
        ("ray::ServeReplica:ministral:Preprocess", "preprocess"),
        ("ray::ServeReplica:ray-serve-llm:LLMServer:ministral-3b", "server"),
        ("ray::ServeReplica:ray-serve-llm:OpenAiIngress", "ingress"),
        ("ray::ServeReplica:other:Something", "something"),
        ("ray::ProxyActor", "proxy"),
        ("ray::HAProxyManager", "proxy"),
        ("VLLM::EngineCore", ENGINE),
        ("VLLM::Worker_TP0", ENGINE),
        (f"{sys.executable} -m vllm.entrypoints.openai.api_server --port=8400", "api server"),
        ("ray::ServeController", RUNTIME),
        ("/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --node_id=x", RUNTIME),
        ("/usr/sbin/haproxy -f /tmp/haproxy-serve/haproxy.cfg", "proxy"),
    ],
)
def test_process_titles_map_to_groups(title, group):
    assert process_group(title) == group


def test_a_vllm_process_whose_command_line_kept_its_spawn_arguments_is_the_engine_by_its_name():
    spawned = f"{sys.executable} -B -c from multiprocessing.spawn import spawn_main; spawn_main(tracker_fd=7)"
    assert process_group(spawned, name="VLLM::EngineCor") == ENGINE
    assert process_group(spawned, name="python") == RUNTIME


def test_serving_cpu_is_everything_but_the_engine():
    assert serving_cpu_s({"proxy": 1.5, "ingress": 2.0, ENGINE: 10.0}) == pytest.approx(3.5)
    assert per_1k_tokens(3.5, 7000) == pytest.approx(0.5)
    assert per_1k_tokens(3.5, 0) is None


# Burns `sys.argv[1]` CPU-seconds once told to (a line on stdin), then idles.
BURNER = """
import sys, time
sys.stdin.readline()
start = time.process_time()
while time.process_time() - start < float(sys.argv[1]):
    pass
print("done", flush=True)
time.sleep(60)
"""


def _burner(title: str, seconds: float, mark: str) -> subprocess.Popen:
    # `exec -a` sets the title (argv[0]) as Ray and vLLM set theirs.
    return subprocess.Popen(
        ["bash", "-c", f'exec -a "{title}" "{sys.executable}" -c "$0" {seconds}', BURNER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, SERVER_MARK: mark},
    )


def test_meter_counts_the_cpu_each_marked_process_used_between_start_and_stop():
    mark = f"cpu-meter-{os.getpid()}"
    proxy = _burner("ray::ProxyActor", 0.4, mark)
    engine = _burner("VLLM::EngineCore", 0.2, mark)
    unmarked = _burner("ray::ProxyActor", 0.3, "someone-else")
    try:
        time.sleep(0.5)  # started, their start-up CPU before `start` is not counted
        meter = CpuMeter(f"{SERVER_MARK}={mark}")
        meter.start()
        for process in (proxy, engine, unmarked):
            process.stdin.write("go\n")
            process.stdin.flush()
        for process in (proxy, engine, unmarked):
            assert process.stdout.readline() == "done\n"
        cpu_s = meter.stop()
    finally:
        for process in (proxy, engine, unmarked):
            process.kill()
            process.wait()
    assert set(cpu_s) == {"proxy", ENGINE}
    assert cpu_s["proxy"] == pytest.approx(0.4, abs=0.1)
    assert cpu_s[ENGINE] == pytest.approx(0.2, abs=0.1)
    assert meter.exited == 0


# Sets its title as vLLM titles its engine core, then burns like BURNER.
RETITLED_BURNER = "import setproctitle, sys; setproctitle.setproctitle(sys.argv[2]); exec(sys.argv[3])"


def test_a_process_whose_title_overwrote_its_environment_is_found_through_its_marked_parent():
    mark = f"cpu-meter-retitled-{os.getpid()}"
    # The marked parent stays: bash runs a list's first command in a child of its own.
    parent = subprocess.Popen(
        [
            "bash",
            "-c",
            '"$0" -c "$1" 0.3 "$2" "$3"; exit $?',
            sys.executable,
            RETITLED_BURNER,
            "VLLM::EngineCore",
            BURNER,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, SERVER_MARK: mark},
    )
    try:
        engine = _retitled_child(parent.pid, "VLLM::EngineCore")
        # What the fix is for: setproctitle wiped the mark from the child's own environment.
        assert f"{SERVER_MARK}={mark}".encode() not in Path(f"/proc/{engine.pid}/environ").read_bytes()
        meter = CpuMeter(f"{SERVER_MARK}={mark}")
        meter.start()
        parent.stdin.write("go\n")
        parent.stdin.flush()
        assert parent.stdout.readline() == "done\n"
        cpu_s = meter.stop()
    finally:
        for process in [*psutil.Process(parent.pid).children(), parent]:
            process.kill()
        parent.wait()
    assert cpu_s[ENGINE] == pytest.approx(0.3, abs=0.1)


def _retitled_child(parent_pid: int, title: str) -> psutil.Process:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for child in psutil.Process(parent_pid).children():
            if child.cmdline()[:1] == [title]:
                return child
        time.sleep(0.05)
    raise AssertionError(f"no child of {parent_pid} took the title {title}")


def test_an_untitled_process_a_decoder_or_server_started_is_the_engines():
    spawned = "/venv/bin/python -B -c from multiprocessing.spawn import spawn_main; spawn_main(tracker_fd=79)"
    decoder = "ray::ServeReplica:ministral:Decoder"
    assert group_with_ancestors(spawned, "python", [decoder, "raylet", "ministral-serve run"]) == ENGINE
    vllm_server = "python -m vllm.entrypoints.openai.api_server --model m"
    assert group_with_ancestors(spawned, "python", [vllm_server]) == ENGINE
    # Ray's own workers and a launcher's children stay Ray's.
    assert group_with_ancestors(spawned, "python", ["raylet", "ministral-serve run"]) == RUNTIME
    assert (
        group_with_ancestors("ray::ServeReplica:ministral:Ingress", "ray::ServeRepl", [decoder]) == "ingress"
    )
