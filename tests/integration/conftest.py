"""One running application (real Ray Serve + vLLM on CPU) shared by the integration tests."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

APP_NAME = "ministral"


@dataclass(frozen=True)
class Service:
    base_url: str
    model: str
    checkpoint: Path
    max_model_len: int

    @property
    def openai_url(self) -> str:
        return f"{self.base_url}/v1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def service(demo_checkpoint) -> Service:
    import ray
    from ray import serve

    from serve.app import build_app
    from serve.config import AppConfig

    # float32 so that greedy tokens can be compared exactly with transformers:
    # vLLM's CPU kernels and torch's eager ops round bfloat16 differently.
    config = AppConfig.model_validate(
        {
            "model": {"source": str(demo_checkpoint), "served_name": "demo"},
            "engine": {
                "dtype": "float32",
                "max_model_len": 2048,
                "cpu_kv_cache_space_gib": 1,
                "max_num_seqs": 32,
            },
            "deployments": {"ingress": {"num_cpus": 0}, "decoder": {"num_cpus": 1}},
        }
    )
    port = _free_port()
    os.environ["RAY_worker_niceness"] = "0"  # noqa: SIM112 (Ray spells it so)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": {"MINISTRAL_SERVE_CACHE": os.environ["MINISTRAL_SERVE_CACHE"]}},
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    yield Service(
        base_url=f"http://127.0.0.1:{port}",
        model="demo",
        checkpoint=demo_checkpoint,
        max_model_len=2048,
    )
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def client(service):
    from openai import OpenAI

    return OpenAI(base_url=service.openai_url, api_key="unused", timeout=120, max_retries=0)


@pytest.fixture(scope="session")
def decoder_handle(service):
    from ray import serve

    return serve.get_deployment_handle("Decoder", app_name=APP_NAME)
