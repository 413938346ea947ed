"""The stacks under test, each a server process started and stopped by the benchmark.

`OurService` is `ministral-serve run` on its own local Ray instance.
`VllmServer` is vLLM's own OpenAI-compatible server
(`vllm.entrypoints.openai.api_server`) with the same engine settings: on
the language-model view of the checkpoint for text (what our decoder
loads), on the multimodal checkpoint for images. `RayServeLlm` is a peer,
Ray Serve LLM on its own local Ray instance, with the same engine settings,
for text.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import yaml

from deployments.engine_settings import cpu_environment, engine_parallelism, usable_cores
from serve.config import AppConfig, EngineConfig

READY_TIMEOUT_S = 900
# Set in each server's environment, which all its processes inherit, to find them at stop.
SERVER_MARK = "MINISTRAL_BENCH_SERVER"


class ServerFailed(RuntimeError):
    pass


class Server:
    """A server subprocess in its own process group, with its output in `log_path`.

    It stays in the runner's session. Linux schedules each session as one group
    (autogroup): with the server in a session of its own, vLLM's spin-waiting
    engine core kept the load generator off its core for ~280 ms at a time, and
    whole streams reached the client in one piece.
    """

    name: str
    # The stack's name in the results.
    key: str
    # Answers 200 once the server takes requests.
    ready_path = "/v1/models"

    def __init__(self, port: int, log_path: Path):
        self.port = port
        self.log_path = log_path
        self.base_url = f"http://127.0.0.1:{port}"
        self._process: subprocess.Popen | None = None
        self._mark = f"{os.getpid()}-{port}"

    @property
    def process_mark(self) -> str:
        """The NAME=value entry in the environment of every process the server starts."""
        return f"{SERVER_MARK}={self._mark}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return {}

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # Appended to: a benchmark starts each stack once per repeat.
        with self.log_path.open("a") as log:
            self._process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.environment(), SERVER_MARK: self._mark},
                process_group=0,
                # stop() asks for a clean shutdown with SIGINT, which a runner started
                # in the background (`cmd &`, nohup) passes on ignored.
                preexec_fn=_default_sigint,
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ServerFailed(f"{self.name} exited with {self._process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}{self.ready_path}", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(2)
        self.stop()
        raise ServerFailed(f"{self.name} not ready after {READY_TIMEOUT_S} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self._process is None:
            return
        # SIGINT first: both servers shut their engines (and our Ray instance) down on it.
        for sig, grace_s in ((signal.SIGINT, 60), (signal.SIGKILL, 10)):
            if self._process.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, sig)
            try:
                self._process.wait(grace_s)
                break
            except subprocess.TimeoutExpired:
                continue
        # What the server left behind: Ray workers and vLLM's engine processes
        # run in process groups of their own, and some outlive their parents;
        # all of them inherit the server's environment.
        for pid in marked_processes(self.process_mark):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *_) -> None:
        self.stop()


class RayServeStack(Server):
    """A stack on a Ray instance of its own, started by `python -m MODULE --config --host --port`
    with our Serve config (its first application's args carry the model and engine settings)."""

    module: tuple[str, ...]
    import_path = "serve.app:build_app"

    def __init__(self, config: AppConfig, port: int, log_path: Path):
        super().__init__(port, log_path)
        self._config_path = log_path.with_suffix(".serve.yaml")
        document = {
            "applications": [
                {
                    "name": "ministral",
                    "route_prefix": "/",
                    "import_path": self.import_path,
                    "args": config.model_dump(mode="json", exclude_unset=True),
                }
            ]
        }
        self._config_path.parent.mkdir(parents=True, exist_ok=True)
        self._config_path.write_text(yaml.safe_dump(document, sort_keys=False))

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            *self.module,
            "--config",
            str(self._config_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]

    def environment(self) -> dict[str, str]:
        # A Ray instance of its own, even when the caller has one (the test suite does).
        return {"RAY_ADDRESS": "local"}


class OurService(RayServeStack):
    name = key = "ours"
    module = ("serve", "run")
    # Every stage running: the ingress answers /v1/models while the others may still be starting.
    ready_path = "/health"


class ServingCeiling(OurService):
    """Our service with the stand-in decoder of `benchmarks.ceiling`, an engine that costs nothing:
    what the serving layer alone can stream."""

    name = key = "ours (stand-in engine)"
    import_path = "benchmarks.ceiling:build_app"


class RayServeLlm(RayServeStack):
    name = key = "ray-serve-llm"
    module = ("benchmarks.ray_serve_llm",)


class VllmServer(Server):
    key = "vllm"

    def __init__(
        self,
        config: AppConfig,
        model: Path | str,
        port: int,
        log_path: Path,
        *,
        name: str = "vllm",
        extra_pythonpath: Path | None = None,
        extra_args: tuple[str, ...] = (),
    ):
        super().__init__(port, log_path)
        self.name = name
        self._config = config
        self._model = model
        self._extra_args = extra_args
        self._extra_pythonpath = extra_pythonpath
        self._on_gpu = on_gpu()

    def command(self) -> list[str]:
        engine = self._config.engine
        parallelism = engine_parallelism(engine, on_gpu=self._on_gpu, cpu_cores=len(usable_cores()))
        command = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--host=127.0.0.1",
            f"--port={self.port}",
            f"--model={self._model}",
            f"--served-model-name={self._config.model.name}",
            "--tokenizer-mode=mistral",
            f"--dtype={engine.dtype}",
            f"--max-num-seqs={engine.max_num_seqs}",
            f"--tensor-parallel-size={parallelism.tensor_parallel}",
            f"--pipeline-parallel-size={parallelism.pipeline_parallel}",
            f"--gpu-memory-utilization={engine.gpu_memory_utilization}",
            "--enable-prefix-caching" if engine.enable_prefix_caching else "--no-enable-prefix-caching",
        ]
        if engine.max_model_len is not None:
            command.append(f"--max-model-len={engine.max_model_len}")
        if engine.max_num_batched_tokens is not None:
            command.append(f"--max-num-batched-tokens={engine.max_num_batched_tokens}")
        if engine.enforce_eager:
            command.append("--enforce-eager")
        return [*command, *self._extra_args]

    def environment(self) -> dict[str, str]:
        environment = {}
        if not self._on_gpu:
            environment.update(engine_cpu_environment(self._config.engine))
        if self._extra_pythonpath is not None:
            environment["PYTHONPATH"] = os.pathsep.join(
                filter(None, [str(self._extra_pythonpath), os.environ.get("PYTHONPATH")])
            )
        return environment


def engine_cpu_environment(engine: EngineConfig) -> dict[str, str]:
    """What vLLM's CPU backend reads at start-up, for an engine of this config on this machine's cores."""
    cores = usable_cores()
    return cpu_environment(engine, engine_parallelism(engine, on_gpu=False, cpu_cores=len(cores)), cores)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def marked_processes(mark: str) -> list[int]:
    """The processes whose environment holds `mark` (a NAME=value entry), and their descendants.

    A process that sets its title with setproctitle, as vLLM's engine core and
    Ray's workers do, overwrites part of the memory `/proc/PID/environ` reads:
    whether the mark survives depends on the lengths of its command line and
    environment. Its ancestors' marks are still there, a server's own process
    (`ministral-serve run`, `vllm serve`) and Ray's raylet first among them.
    """
    wanted = mark.encode()
    children: dict[int, list[int]] = {}
    marked = []
    for process in psutil.process_iter(["ppid"]):
        children.setdefault(process.info["ppid"], []).append(process.pid)
        if process.pid != os.getpid():
            with contextlib.suppress(OSError):
                if wanted in Path(f"/proc/{process.pid}/environ").read_bytes().split(b"\0"):
                    marked.append(process.pid)
    found = set()
    while marked:
        pid = marked.pop()
        if pid not in found:
            found.add(pid)
            marked.extend(children.get(pid, ()))
    return sorted(found)


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
