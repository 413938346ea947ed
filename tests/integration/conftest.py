"""One running application (real Ray Serve + vLLM on CPU) shared by the integration tests."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from serve.config import AppConfig
from tests.ports import free_port

APP_NAME = "ministral"
LOGICAL_GPUS = 4
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


@pytest.fixture(scope="session")
def service(demo_checkpoint) -> Service:
    import ray
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
                # The test image server runs on 127.0.0.1.
                "allow_private_networks": True,
                "max_images_per_request": 6,
                "max_image_bytes": 1_000_000,
                "max_image_pixels": 4_000_000,
                "fetch_timeout_s": 3.0,
                "max_redirects": 2,
            },
            "deployments": {
                "ingress": {"num_cpus": 0},
                "preprocess": {"num_replicas": 2, "num_cpus": 0},
                "encoder": {"num_cpus": 0},
                "decoder": {"num_cpus": 1},
            },
        }
    )
    port, metrics_port = free_port(), free_port()
    os.environ["RAY_worker_niceness"] = "0"  # noqa: SIM112 (Ray spells it so)
    # Metrics reach the export endpoint within a second instead of ten.
    os.environ["RAY_metrics_report_interval_ms"] = "1000"  # noqa: SIM112
    # Four logical GPUs: the layout tests place GPU bundles on this CPU machine.
    ray.init(
        num_cpus=2,
        num_gpus=LOGICAL_GPUS,
        include_dashboard=False,
        _metrics_export_port=metrics_port,
        runtime_env={"env_vars": {"MINISTRAL_SERVE_CACHE": os.environ["MINISTRAL_SERVE_CACHE"]}},
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    yield Service(
        base_url=f"http://127.0.0.1:{port}",
        metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
        model="demo",
        checkpoint=demo_checkpoint,
        config=config,
    )
    serve.shutdown()
    ray.shutdown()


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
