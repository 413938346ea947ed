"""Every layout preset deploys on a Ray cluster with four logical GPUs, is placed as its preset says,
and answers requests.

The GPUs are Ray's logical resources on this CPU machine: placement groups,
bundles and GPU accounting are Ray's real ones; the engine inside each
decoder replica is real vLLM on the CPU, its world scaled down to the cores
there are (deployments/engine_settings.py).
"""

import json

import pytest
import ray
from openai import OpenAI
from ray import serve

from deployments.engine_settings import engine_parallelism, usable_cores
from serve.app import build_app
from serve.capacity import GIB, TextModel, kv_capacity
from serve.config import AppConfig
from serve.layouts import ENCODER_GPU_SHARE, LAYOUTS, get_layout
from tests.image_server import data_url, image_bytes
from tests.integration.conftest import LOGICAL_GPUS
from tests.polling import wait_for


def layout_config(name: str, checkpoint) -> AppConfig:
    return AppConfig.model_validate(
        {
            "layout": name,
            "model": {"source": str(checkpoint), "served_name": name},
            "engine": {
                "dtype": "float32",
                "max_model_len": 512,
                "cpu_kv_cache_space_gib": 1,
                "max_num_seqs": 8,
            },
            # Logical CPUs are few here; the GPU bundles are what is under test.
            "deployments": {
                "ingress": {"num_cpus": 0},
                "preprocess": {"num_cpus": 0},
                "decoder": {"num_cpus": 0},
            },
        }
    )


def replica_placement_groups(app: str) -> list[dict]:
    return [
        pg
        for pg in ray.util.placement_group_table().values()
        if pg["name"].startswith(f"SERVE_REPLICA::{app}#Decoder#") and pg["state"] == "CREATED"
    ]


def greedy_tokens(client, model: str) -> list[int]:
    response = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name three rivers."},
        ],
        max_tokens=12,
        temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    return response.choices[0].model_extra["token_ids"]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_preset_deploys_is_placed_and_answers(service, client, demo_checkpoint, name):
    reference_client = client
    layout = get_layout(name)
    config = layout_config(name, demo_checkpoint)
    app = f"layout-{name}"
    free_gpus_before = ray.available_resources().get("GPU", 0)
    assert free_gpus_before == LOGICAL_GPUS
    serve.run(build_app(config), name=app, route_prefix=f"/{app}")
    try:
        groups = replica_placement_groups(app)
        assert len(groups) == layout.decoder_replicas
        decoder_gpus = 0.0
        for group in groups:
            bundles = [dict(bundle) for bundle in group["bundles"].values()]
            assert bundles == [{"GPU": layout.decoder_gpu_per_rank}] * layout.gpus_per_decoder
            assert group["strategy"] == ("STRICT_PACK" if layout.pipeline_parallel == 1 else "PACK")
            decoder_gpus += sum(bundle["GPU"] for bundle in bundles)
        # What the cluster holds beyond the decoders' bundles is the encoder's:
        # a slice of a decoder GPU, or GPUs of its own.
        held = free_gpus_before - ray.available_resources().get("GPU", 0)
        encoder_gpus = ENCODER_GPU_SHARE if layout.encoder_shares_a_decoder_gpu else layout.encoder_gpus
        assert held - decoder_gpus == pytest.approx(encoder_gpus)
        assert held <= layout.gpus

        # The planner's arithmetic gives the KV cache vLLM itself sized, for the
        # shape the engine runs here (each CPU rank gets cpu_kv_cache_space_gib).
        info = serve.get_deployment_handle("Decoder", app_name=app).engine_info.remote().result(timeout_s=60)
        shape = engine_parallelism(config.engine, on_gpu=False, cpu_cores=len(usable_cores()))
        model = TextModel.from_config(
            json.loads((demo_checkpoint / "config.json").read_text())["text_config"]
        )
        planned = kv_capacity(
            model,
            [config.engine.cpu_kv_cache_space_gib * GIB] * shape.pipeline_parallel,
            tensor_parallel=shape.tensor_parallel,
            max_model_len=info.max_model_len,
            block_size=info.kv_block_size,
            kv_dtype_bytes=4,  # float32
        )
        assert (planned.blocks, planned.tokens) == (info.kv_cache_blocks, info.kv_cache_tokens)
        assert planned.max_concurrency == pytest.approx(info.max_concurrency)

        client = OpenAI(base_url=f"{service.base_url}/{app}/v1", api_key="unused", timeout=120, max_retries=0)
        content = [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": data_url(image_bytes((56, 56)))}},
        ]
        for message in ("Hello!", content):
            response = client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": message}], max_tokens=3
            )
            assert response.usage.completion_tokens == 3
        # Split across ranks or not, the model computes the same greedy tokens
        # as the single-rank session service on the same checkpoint.
        assert greedy_tokens(client, name) == greedy_tokens(reference_client, service.model)
    finally:
        serve.delete(app)
    # Ray removes a deleted replica's placement group some time after serve.delete returns.
    assert wait_for(lambda: ray.available_resources().get("GPU", 0) == LOGICAL_GPUS, timeout_s=60), (
        f"{ray.available_resources().get('GPU', 0)} of {LOGICAL_GPUS} GPUs free after deleting {app}"
    )
