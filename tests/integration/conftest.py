"""The suite's own Ray instance, and one running application (real Ray Serve + vLLM on CPU) on it,
shared by the integration tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from serve.config import AppConfig
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
    """The suite's own Ray instance, with Serve's HTTP proxy on 127.0.0.1."""

    base_url: str
    metrics_url: str


@pytest.fixture(scope="session")
def ray_cluster() -> SuiteCluster:
    import ray
    from ray import serve

    port, metrics_port = free_port(), free_port()
    start_own_ray(metrics_port=metrics_port)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield SuiteCluster(
        base_url=f"http://127.0.0.1:{port}", metrics_url=f"http://127.0.0.1:{metrics_port}/metrics"
    )
    serve.shutdown()
    ray.shutdown()


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
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
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
