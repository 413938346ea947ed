"""The suite's own Ray instance, and one running application (real Ray Serve + vLLM on CPU) on it,
shared by the integration tests."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from serve.config import AppConfig
from tests.polling import wait_for
from tests.ports import free_port
from tests.prompts import SYSTEM_PROMPT_DATE
from tests.ray_instance import start_own_ray
from tests.reference import checkpoint_system_prompt

APP_NAME = "ministral"
# About five 100x60 px images' worth of image-token embeddings (12 tokens x 256 x 4 bytes each).
ENCODER_CACHE_BYTES = 5 * 12 * 256 * 4


@dataclass(frozen=True)
class Service:
    base_url: str
    metrics_url: str
    model: str
    checkpoint: Path
    config: AppConfig

    @property
    def openai_url(self) -> str:
        return f"{self.base_url}/v1"

    @property
    def max_model_len(self) -> int:
        return self.config.engine.max_model_len

    @property
    def default_system_prompt(self) -> str:
        """The checkpoint's system prompt as the service fills it (on its pinned date)."""
        return checkpoint_system_prompt(self.checkpoint, self.config.system_prompt_date)


@dataclass(frozen=True)
class SuiteCluster:
    """The suite's own Ray instance, with its front door (HAProxy) on 127.0.0.1."""

    base_url: str
    metrics_url: str

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])


@pytest.fixture(scope="session")
def ray_cluster() -> SuiteCluster:
    """Behind the front door users get: Ray Serve's HAProxy, hardened as `ministral-serve run`
    starts it (serve/front_door.py), on ports of the suite's own. Serve's Python proxy, the other
    supported front door, is what `serve deploy` of serve/configs/ runs (test_serve_deploy.py)."""
    import ray
    from ray import serve

    from serve.front_door import front_door_environment

    port, metrics_port = free_port(), free_port()
    with front_door_environment("haproxy") as front_door:
        front_door |= {
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        }
        # Ray's processes take the environment at its start; the tests' own subprocesses after
        # it (a `ray start`, a `serve deploy`) get the one they had.
        with patched_environment(front_door):
            start_own_ray(metrics_port=metrics_port)
            serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield SuiteCluster(
            base_url=f"http://127.0.0.1:{port}", metrics_url=f"http://127.0.0.1:{metrics_port}/metrics"
        )
        serve.shutdown()
        ray.shutdown()


@contextlib.contextmanager
def patched_environment(variables: dict[str, str]):
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def listening_process(port: int) -> str | None:
    """The name of the process that listens on `port`."""
    import psutil

    for connection in psutil.net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port and connection.pid:
            return psutil.Process(connection.pid).name()
    return None


def run_behind_the_front_door(application, name: str, route_prefix: str, base_url: str) -> str:
    """`serve.run` an application, and its URL once the front door routes to it: HAProxy takes
    a new route when Serve's proxy rewrites its config, which may be after `serve.run` returns."""
    import httpx
    from ray import serve

    serve.run(application, name=name, route_prefix=route_prefix)
    url = f"{base_url}{route_prefix.rstrip('/')}"

    def routed() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    assert wait_for(routed, timeout_s=120), f"the front door never routed {route_prefix} to {name}"
    return url


@pytest.fixture(scope="session")
def service(ray_cluster, demo_checkpoint) -> Service:
    from ray import serve

    from serve.app import build_app

    # float32 so that greedy tokens can be compared exactly with transformers:
    # vLLM's CPU kernels and torch's eager ops round bfloat16 differently.
    # Two preprocess replicas, so that tests can see the stage scale out.
    config = AppConfig.model_validate(
        {
            "model": {"source": str(demo_checkpoint), "served_name": "demo"},
            "engine": {
                "dtype": "float32",
                "max_model_len": 2048,
                "cpu_kv_cache_space_gib": 1,
                "max_num_seqs": 32,
            },
            "encoder": {"cache_bytes": ENCODER_CACHE_BYTES},
            "images": {
                # The test image server runs on 127.0.0.1, on a port of its own.
                "allow_private_networks": True,
                "allowed_ports": [],
                "max_images_per_request": 6,
                "max_image_bytes": 1_000_000,
                "fetch_timeout_s": 3.0,
                "max_redirects": 2,
            },
            "system_prompt_date": SYSTEM_PROMPT_DATE.isoformat(),
            "deployments": {
                "ingress": {"num_cpus": 0},
                "preprocess": {"num_replicas": 2, "num_cpus": 0},
                "encoder": {"num_cpus": 0},
                "decoder": {"num_cpus": 1},
            },
        }
    )
    run_behind_the_front_door(build_app(config), APP_NAME, "/", ray_cluster.base_url)
    assert listening_process(ray_cluster.port) == "haproxy", "the suite's front door is not HAProxy"
    yield Service(
        base_url=ray_cluster.base_url,
        metrics_url=ray_cluster.metrics_url,
        model="demo",
        checkpoint=demo_checkpoint,
        config=config,
    )
    serve.delete(APP_NAME)


@pytest.fixture(scope="session")
def client(service):
    from openai import OpenAI

    return OpenAI(base_url=service.openai_url, api_key="unused", timeout=120, max_retries=0)


@pytest.fixture(scope="session")
def tokenizer(service):
    """mistral_common's tokenizer for the demo checkpoint: the reference for prompts and decoding."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(str(service.checkpoint / "tekken.json"))


@pytest.fixture(scope="session")
def tekken(tokenizer):
    return tokenizer.instruct_tokenizer.tokenizer


@pytest.fixture(scope="session")
def decoder_handle(service):
    from ray import serve

    return serve.get_deployment_handle("Decoder", app_name=APP_NAME)
