"""The capacity planner against vLLM's own arithmetic (its KV cache spec and pipeline split)."""

import json
import math
import subprocess
import sys

import pytest
import torch
from vllm.distributed.utils import get_pp_indices
from vllm.v1.kv_cache_interface import FullAttentionSpec

from serve.capacity import (
    GPU_MEMORY_GIB,
    PUBLISHED_TEXT_MODEL,
    TextModel,
    kv_capacity,
    pipeline_partition,
    plan_all,
    plan_layout,
)
from serve.demo_checkpoint import build_config
from serve.layouts import LAYOUTS, get_layout

# The text_config of mistralai/Ministral-3-3B-Instruct-2512's config.json.
PUBLISHED_TEXT_CONFIG = {
    "model_type": "ministral3",
    "hidden_size": 3072,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 131072,
    "max_position_embeddings": 262144,
    "tie_word_embeddings": True,
}


def vllm_page_bytes(model: TextModel, block_size: int, tensor_parallel: int, dtype=torch.bfloat16) -> int:
    """vLLM's own size of one layer's KV block (v1/kv_cache_interface.py)."""
    spec = FullAttentionSpec(
        block_size=block_size,
        num_kv_heads=max(1, model.kv_heads // tensor_parallel),
        head_size=model.head_dim,
        dtype=dtype,
    )
    return spec.page_size_bytes


@pytest.mark.parametrize("tensor_parallel", [1, 2, 4, 8, 16])
def test_kv_bytes_per_token_of_the_published_config(tensor_parallel):
    model = TextModel.from_config(PUBLISHED_TEXT_CONFIG)
    assert model == PUBLISHED_TEXT_MODEL
    expected = model.layers * vllm_page_bytes(model, 16, tensor_parallel) // 16
    assert model.kv_bytes_per_token(tensor_parallel) == expected


@pytest.mark.parametrize(("layers", "stages"), [(26, 1), (26, 2), (26, 3), (26, 4), (26, 8), (2, 2), (7, 3)])
def test_pipeline_split_is_vllms(layers, stages):
    expected = [
        end - start for start, end in (get_pp_indices(layers, rank, stages) for rank in range(stages))
    ]
    assert pipeline_partition(layers, stages) == expected


def test_capacity_arithmetic_matches_vllms_log_for_a_known_case():
    # 40 GiB of bf16 KV at TP1, 32k context: vLLM logs 403,296 tokens and 12.31x.
    capacity = kv_capacity(
        PUBLISHED_TEXT_MODEL, [40 * 1024**3], tensor_parallel=1, max_model_len=32768, block_size=16
    )
    page = vllm_page_bytes(PUBLISHED_TEXT_MODEL, 16, 1)
    assert capacity.blocks == 40 * 1024**3 // (26 * page)
    assert capacity.max_concurrency == capacity.blocks / math.ceil(32768 / 16)
    assert (capacity.tokens, round(capacity.max_concurrency, 2)) == (403_296, 12.31)


def test_the_fullest_pipeline_stage_decides():
    # PP3 splits 26 layers 9/9/8: a 9-layer stage with as much memory holds fewer blocks.
    page = vllm_page_bytes(PUBLISHED_TEXT_MODEL, 16, 1)
    capacity = kv_capacity(
        PUBLISHED_TEXT_MODEL, [10 * 1024**3] * 3, tensor_parallel=1, max_model_len=4096, block_size=16
    )
    assert capacity.blocks == 10 * 1024**3 // (9 * page)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_layout_fits_an_h100_at_full_context(name):
    plan = plan_layout(get_layout(name), gpu_memory_gib=GPU_MEMORY_GIB["H100"], max_model_len=262144)
    assert plan.fits, plan.reason
    assert plan.max_concurrency >= 1
    replicas = get_layout(name).decoder_replicas
    # Each figure is rounded to two decimals.
    assert plan.max_concurrency == pytest.approx(
        plan.max_concurrency_per_replica * replicas, abs=0.01 * replicas
    )
    for rank in plan.ranks:
        assert (
            rank.weights_gib + rank.reserve_gib + rank.kv_cache_gib
            <= 79.1 * plan.gpu_memory_utilization + 1e-6
        )


def test_more_gpus_hold_more():
    plans = {
        plan.layout: plan for plan in plan_all(gpu_memory_gib=GPU_MEMORY_GIB["L40S"], max_model_len=65536)
    }
    assert plans["2gpu-tp"].kv_tokens_per_replica > 2 * plans["1gpu"].kv_tokens_per_replica
    assert plans["4gpu-tp"].max_concurrency > plans["2gpu-tp"].max_concurrency > plans["1gpu"].max_concurrency
    # FP8 weights leave more room for the KV cache than BF16.
    bf16 = plan_layout(get_layout("1gpu"), gpu_memory_gib=44.4, max_model_len=65536, variant="instruct-bf16")
    assert bf16.kv_tokens_per_replica < plans["1gpu"].kv_tokens_per_replica


def test_infeasible_layouts_are_flagged_with_the_reason():
    small = plan_layout(get_layout("1gpu"), gpu_memory_gib=GPU_MEMORY_GIB["T4"], max_model_len=262144)
    assert not small.fits and "less than one request of 262,144" in small.reason
    assert small.max_concurrency == 0
    split = plan_layout(get_layout("4gpu-tp"), gpu_memory_gib=80, gpus_per_node=2)
    assert not split.fits and "must sit on one node" in split.reason
    too_long = plan_layout(get_layout("1gpu"), gpu_memory_gib=80, max_model_len=300_000)
    assert not too_long.fits and "exceeds the model's 262144" in too_long.reason


def test_demo_checkpoint_dimensions_come_from_its_config():
    demo = TextModel.from_config(build_config("instruct")["text_config"])
    assert (demo.layers, demo.kv_heads, demo.head_dim) == (2, 2, 64)
    assert demo.kv_bytes_per_token(dtype_bytes=4) == 2 * 2 * 2 * 64 * 4


def run_plan(*args):
    result = subprocess.run(
        [sys.executable, "-m", "serve", "plan", *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_plan_command_table_and_json():
    table = run_plan("--gpu", "L4", "--max-model-len", "262144")
    assert all(name in table for name in LAYOUTS)
    assert "does not fit" in table
    one = json.loads(run_plan("--layout", "2gpu-tp", "--gpu-memory-gib", "80", "--json"))
    expected = plan_layout(get_layout("2gpu-tp"), gpu_memory_gib=80)
    assert one["max_concurrency"] == expected.max_concurrency > 0
    assert one["layout"] == "2gpu-tp" and one["fits"] is True
