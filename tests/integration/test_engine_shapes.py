"""Each engine shape that runs on this CPU deploys, sizes its KV cache as the planner says, answers,
and computes the same greedy tokens as the single-rank session service.

On a CPU machine the decoder runs its preset's shape scaled down to the
cores (deployments/engine_settings.py), with vLLM's multiprocessing
executor: on two cores the eleven presets come down to TP1 (the session
service itself), TP2, PP2 and data-parallel TP1 replicas. One real engine
starts per multi-rank shape, from the preset named below; CPU_SHAPES maps
every preset to the shape that stands for it. The data-parallel shapes start
no engine here: each replica is the session service's TP1 engine, and their
placement (a group per replica) is test_placement.py's. Placement of every preset is
test_placement.py's; the Ray-executor path that hands the placement group to
vLLM on GPUs is tests/gpu/'s.
"""

import json
from dataclasses import replace

import pytest
from openai import OpenAI
from ray import serve

from deployments.engine_settings import engine_parallelism, usable_cores
from serve.app import build_app
from serve.capacity import GIB, TextModel, kv_capacity
from serve.layouts import LAYOUTS, get_layout
from tests.image_server import data_url, image_bytes
from tests.integration.placement import decoder_placement_groups, free_gpus, layout_config
from tests.polling import wait_for
from tests.ray_instance import LOGICAL_GPUS

# The preset whose engine runs for each shape on two cores. TP1 is the session service's own.
ENGINE_PRESETS = {"TP2": "2gpu-tp", "PP2": "2gpu-pp"}
# What each preset runs as on two CPU cores.
CPU_SHAPES = {
    "1gpu": "TP1",
    "2gpu-encoder": "TP1",
    "2gpu-tp": "TP2",
    "4gpu-tp": "TP2",
    "4gpu-tp2pp2": "TP2",
    "2gpu-pp": "PP2",
    "3gpu-pp": "PP2",
    "4gpu-pp": "PP2",
    "4gpu-encoder-pp3": "PP2",
    "2gpu-dp": "2 x TP1",
    "4gpu-dp": "4 x TP1",
}


def cpu_shape(name: str, cores: int) -> str:
    """The preset's shape as its engines run it on `cores` CPU cores."""
    layout = get_layout(name)
    ranks = engine_parallelism(layout_config(name, "unused").engine, on_gpu=False, cpu_cores=cores)
    return replace(
        layout, tensor_parallel=ranks.tensor_parallel, pipeline_parallel=ranks.pipeline_parallel
    ).shape


def test_every_preset_runs_as_a_shape_tested_here():
    assert {name: cpu_shape(name, cores=2) for name in LAYOUTS} == CPU_SHAPES
    tested = {"TP1", *ENGINE_PRESETS}
    # Replicas of the TP1 engine.
    assert set(CPU_SHAPES.values()) - tested == {"2 x TP1", "4 x TP1"}


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


@pytest.mark.parametrize(("shape", "name"), list(ENGINE_PRESETS.items()))
def test_engine_shape_deploys_sizes_its_kv_cache_and_answers(service, client, demo_checkpoint, shape, name):
    assert len(usable_cores()) >= 2, "the engine shapes need two cores"
    assert cpu_shape(name, cores=len(usable_cores())) == shape
    reference_client = client
    layout = get_layout(name)
    # Both shapes split the image-token embeddings' way through the model across ranks.
    config = layout_config(name, demo_checkpoint, images={"max_images_per_request": 1})
    app = f"shape-{name}"
    assert free_gpus() == LOGICAL_GPUS
    serve.run(build_app(config), name=app, route_prefix=f"/{app}")
    try:
        groups = decoder_placement_groups(app)
        assert len(groups) == layout.decoder_replicas
        for group in groups.values():
            bundles = [dict(bundle) for bundle in group["bundles"].values()]
            assert bundles == [{"GPU": layout.decoder_gpu_per_rank}] * layout.gpus_per_decoder

        # The planner's arithmetic gives the KV cache vLLM itself sized, for the
        # shape the engine runs here (each CPU rank gets cpu_kv_cache_space_gib).
        info = serve.get_deployment_handle("Decoder", app_name=app).engine_info.remote().result(timeout_s=60)
        parallelism = engine_parallelism(config.engine, on_gpu=False, cpu_cores=len(usable_cores()))
        model = TextModel.from_config(
            json.loads((demo_checkpoint / "config.json").read_text())["text_config"]
        )
        planned = kv_capacity(
            model,
            [config.engine.cpu_kv_cache_space_gib * GIB] * parallelism.pipeline_parallel,
            tensor_parallel=parallelism.tensor_parallel,
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
    assert wait_for(lambda: free_gpus() == LOGICAL_GPUS, timeout_s=60), (
        f"{free_gpus()} of {LOGICAL_GPUS} GPUs free after deleting {app}"
    )
