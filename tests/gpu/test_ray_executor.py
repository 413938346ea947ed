"""On NVIDIA GPUs: the decoder's Ray-executor path, which hands the replica's placement group to vLLM.

On a CPU machine the decoder runs vLLM's multiprocessing executor, so this
path (deployments/decoder.py, executor "ray") never runs there; these tests
are skipped. On a GPU machine:

    scripts/install.sh gpu,test && .venv/bin/python -m pytest -m gpu tests/gpu

Every layout preset that fits the machine's GPUs deploys with its real
engine on the demo checkpoint. Checked: vLLM's Ray workers hold the GPUs of
every bundle of each decoder replica's placement group, and the greedy
tokens equal those of the one-GPU preset.
"""

from __future__ import annotations

import pytest
import torch

from serve.config import AppConfig
from serve.layouts import LAYOUTS, get_layout
from tests.polling import wait_for
from tests.ports import free_port

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
FITTING = [name for name in LAYOUTS if get_layout(name).gpus <= GPUS] or list(LAYOUTS)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(GPUS == 0, reason="needs NVIDIA GPUs (the Ray-executor path of the decoder)"),
]


def gpu_config(name: str, checkpoint) -> AppConfig:
    return AppConfig.model_validate(
        {
            "layout": name,
            "model": {"source": str(checkpoint), "served_name": name},
            # The demo model's next-token distribution is peaked
            # (tests/unit/test_demo_checkpoint.py), so greedy tokens do not
            # flip between shapes on bfloat16 rounding.
            "engine": {"max_model_len": 512, "max_num_seqs": 8},
        }
    )


@pytest.fixture(scope="module")
def gpu_cluster():
    import os

    import ray
    from ray import serve

    from tests.ray_instance import start_own_ray

    port = free_port()
    start_own_ray(num_cpus=os.cpu_count(), num_gpus=GPUS)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def greedy_tokens(base_url: str, app: str, model: str) -> list[int]:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/{app}/v1", api_key="unused", timeout=300, max_retries=0)
    response = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Name three rivers."}],
        max_tokens=12,
        temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    return response.choices[0].model_extra["token_ids"]


def deployed_tokens(gpu_cluster, checkpoint, name: str) -> tuple[list[int], dict[str, tuple[float, float]]]:
    """Greedy tokens of the preset, and the (reserved, free) GPUs of each decoder placement group."""
    import ray
    from ray import serve

    from serve.app import build_app
    from tests.integration.placement import decoder_placement_groups, gpus_in_group

    app = f"gpu-{name}"
    serve.run(build_app(gpu_config(name, checkpoint)), name=app, route_prefix=f"/{app}")
    try:
        tokens = greedy_tokens(gpu_cluster, app, name)
        gpus_by_group = {group_id: gpus_in_group(group_id) for group_id in decoder_placement_groups(app)}
    finally:
        serve.delete(app)
    assert wait_for(lambda: ray.available_resources().get("GPU", 0) == GPUS, timeout_s=120)
    return tokens, gpus_by_group


@pytest.fixture(scope="module")
def one_gpu_tokens(gpu_cluster, demo_checkpoint) -> list[int]:
    tokens, _ = deployed_tokens(gpu_cluster, demo_checkpoint, "1gpu")
    return tokens


@pytest.mark.parametrize("name", FITTING)
def test_vllms_ray_workers_hold_every_bundle_and_compute_the_same_tokens(
    gpu_cluster, demo_checkpoint, one_gpu_tokens, name
):
    layout = get_layout(name)
    tokens, gpus_by_group = deployed_tokens(gpu_cluster, demo_checkpoint, name)
    assert len(gpus_by_group) == layout.decoder_replicas
    for reserved, free in gpus_by_group.values():
        assert reserved == pytest.approx(layout.gpus_per_decoder * layout.decoder_gpu_per_rank)
        # vLLM's Ray workers took their bundles' GPUs: nothing of the group is left.
        assert free == pytest.approx(0.0, abs=1e-6)
    assert tokens == one_gpu_tokens
