"""The capacity planner against vLLM's own arithmetic (its KV cache spec and pipeline split)."""

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch
from vllm.distributed.utils import get_pp_indices
from vllm.v1.kv_cache_interface import FullAttentionSpec

from serve.capacity import (
    CUDA_GRAPH_BYTES,
    GPU_MEMORY_GIB,
    NCCL_BYTES_PER_PEER,
    NON_TORCH_BYTES,
    PUBLISHED_TEXT_MODEL,
    VARIANTS,
    TextModel,
    format_table,
    kv_capacity,
    pipeline_partition,
    plan_all,
    plan_layout,
    reserve_bytes,
    weight_bytes,
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


def test_one_layers_kv_block_is_vllms_page_on_one_rank_by_default():
    assert PUBLISHED_TEXT_MODEL.kv_page_bytes(16) == vllm_page_bytes(PUBLISHED_TEXT_MODEL, 16, 1)


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


@pytest.fixture(scope="module")
def published_parameters() -> dict[str, int]:
    """The published text model's parameters by kind, counted on transformers' own model
    (built on the meta device: shapes only, no memory)."""
    import transformers

    config = transformers.Ministral3Config(
        **{k: v for k, v in PUBLISHED_TEXT_CONFIG.items() if k != "model_type"}
    )
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    counts = dict.fromkeys(("linear", "layer_norm", "embedding", "final_norm"), 0)
    for name, parameter in model.named_parameters():  # a tied head is the embedding, once
        if ".layers." in name:
            kind = "linear" if parameter.dim() == 2 else "layer_norm"
        else:
            kind = "embedding" if "embed_tokens" in name else "final_norm"
        counts[kind] += parameter.numel()
    gate_up = (
        model.model.layers[0].mlp.gate_proj.out_features + model.model.layers[0].mlp.up_proj.out_features
    )
    return {**counts, "mlp_activation_width": gate_up + config.intermediate_size}  # and the SiLU product


@pytest.mark.parametrize("variant", ["instruct", "instruct-bf16"])
@pytest.mark.parametrize("tensor_parallel", [1, 2])
def test_weights_are_the_decoders_parameters_at_their_bytes(published_parameters, variant, tensor_parallel):
    # Linears at the variant's bytes and the bf16 embedding are sharded by TP; the norms are
    # replicated. The final norm (3,072 weights, 6 KiB) is left out of the estimate.
    bf16 = torch.bfloat16.itemsize
    sharded = (
        published_parameters["linear"] * VARIANTS[variant].linear_weight_bytes
        + published_parameters["embedding"] * bf16
    )
    expected = sharded // tensor_parallel + published_parameters["layer_norm"] * bf16
    weights = weight_bytes(
        PUBLISHED_TEXT_MODEL,
        VARIANTS[variant],
        PUBLISHED_TEXT_MODEL.layers,
        embeddings=1,
        tensor_parallel=tensor_parallel,
    )
    assert weights == expected and isinstance(weights, int)


def test_a_config_without_head_dim_or_tie_word_embeddings_reads_as_transformers_reads_it():
    import transformers

    config = {k: v for k, v in PUBLISHED_TEXT_CONFIG.items() if k not in ("head_dim", "tie_word_embeddings")}
    model = TextModel.from_config(config)
    defaults = transformers.MistralConfig(
        hidden_size=config["hidden_size"], num_attention_heads=config["num_attention_heads"]
    )
    assert model.head_dim == defaults.head_dim and isinstance(model.head_dim, int)
    assert model.tied_embeddings is defaults.tie_word_embeddings is False


def h100_plans(**settings) -> list:
    return plan_all(gpu_memory_gib=GPU_MEMORY_GIB["H100"], max_model_len=262144, **settings)


def test_the_plans_counts_are_whole_numbers_and_a_fitting_plan_gives_no_reason():
    for plan in h100_plans():
        shown = json.loads(json.dumps(plan.as_dict()))
        assert shown["reason"] == ""
        for field in ("kv_bytes_per_token", "kv_tokens_per_replica"):
            assert isinstance(shown[field], int), field
        for rank in shown["ranks"]:
            assert isinstance(rank["layers"], int) and isinstance(rank["kv_blocks"], int)


@pytest.mark.parametrize("name", ["1gpu", "2gpu-tp", "2gpu-pp", "4gpu-tp2pp2"])
def test_each_ranks_blocks_are_its_kv_memory_in_vllms_pages(name):
    layout = get_layout(name)
    plan = plan_layout(layout, gpu_memory_gib=GPU_MEMORY_GIB["H100"], max_model_len=262144)
    page = vllm_page_bytes(PUBLISHED_TEXT_MODEL, 16, layout.tensor_parallel)
    for rank in plan.ranks:
        # kv_cache_gib is rounded to the MiB: the blocks agree to a part in a thousand.
        assert rank.kv_blocks == pytest.approx(rank.kv_cache_gib * 1024**3 / (rank.layers * page), rel=1e-3)
    # The fullest stage decides what the replica holds.
    blocks = min(rank.kv_blocks for rank in plan.ranks)
    assert plan.kv_tokens_per_replica == int(blocks / math.ceil(262144 / 16) * 262144)


def test_the_planner_uses_vllms_gpu_block_size_of_16_tokens():
    assert plan_layout(get_layout("1gpu"), gpu_memory_gib=80) == plan_layout(
        get_layout("1gpu"), gpu_memory_gib=80, block_size=16
    )


def test_an_fp8_kv_cache_is_counted_in_vllms_fp8_pages():
    kv_bytes = 40 * 1024**3
    capacity = kv_capacity(
        PUBLISHED_TEXT_MODEL,
        [kv_bytes],
        tensor_parallel=1,
        max_model_len=32768,
        block_size=16,
        kv_dtype_bytes=1,
    )
    page = vllm_page_bytes(PUBLISHED_TEXT_MODEL, 16, 1, dtype=torch.float8_e4m3fn)
    assert capacity.blocks == kv_bytes // (PUBLISHED_TEXT_MODEL.layers * page)


def test_no_kv_memory_holds_no_block():
    capacity = kv_capacity(PUBLISHED_TEXT_MODEL, [0], tensor_parallel=1, max_model_len=32768, block_size=16)
    assert (capacity.blocks, capacity.tokens, capacity.max_concurrency) == (0, 0, 0)


def reserve(**overrides) -> int:
    settings = dict(
        tensor_parallel=1, pipeline_parallel=1, max_num_batched_tokens=64, max_num_seqs=64, eager=False
    )
    return reserve_bytes(PUBLISHED_TEXT_MODEL, **{**settings, **overrides})


def test_cuda_graphs_are_reserved_unless_the_engine_is_eager():
    assert reserve(eager=False) - reserve(eager=True) == CUDA_GRAPH_BYTES
    layout = get_layout("1gpu")
    graphs = plan_layout(layout, gpu_memory_gib=80)  # vLLM captures graphs by default
    eager = plan_layout(layout, gpu_memory_gib=80, eager=True)
    assert graphs.ranks[0].reserve_gib - eager.ranks[0].reserve_gib == pytest.approx(
        CUDA_GRAPH_BYTES / 1024**3, abs=1e-3
    )


@pytest.mark.parametrize(("tensor_parallel", "pipeline_parallel"), [(2, 1), (1, 2), (2, 2), (1, 1)])
def test_only_a_multi_gpu_engine_reserves_collective_buffers(tensor_parallel, pipeline_parallel):
    # 64 sequences of 64 tokens: the sampler's logits outweigh the MLP, which TP would shard.
    extra = reserve(tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel) - reserve()
    multi_gpu = tensor_parallel * pipeline_parallel > 1
    assert extra == (NCCL_BYTES_PER_PEER if multi_gpu else 0)


@pytest.mark.parametrize("tensor_parallel", [1, 2])
def test_a_long_step_reserves_the_mlp_activations_of_its_tokens(published_parameters, tensor_parallel):
    # 8,192 tokens a step over 64 sequences: the MLP's activations are the peak. Each token
    # holds gate_up's output and the SiLU product in bf16, sharded by TP.
    more = reserve(max_num_batched_tokens=16384, tensor_parallel=tensor_parallel)
    extra = more - reserve(max_num_batched_tokens=8192, tensor_parallel=tensor_parallel)
    width = published_parameters["mlp_activation_width"]
    assert extra == 8192 * width * torch.bfloat16.itemsize // tensor_parallel


def test_more_sequences_reserve_the_samplers_logits_and_token_counts():
    # One step of 128 -> 256 sequences: per sequence, the bf16 logits, their fp32 copy and the
    # probabilities over the vocabulary, and the int32 count of every token.
    extra = reserve(max_num_batched_tokens=256, max_num_seqs=256) - reserve(
        max_num_batched_tokens=128, max_num_seqs=128
    )
    vocab = PUBLISHED_TEXT_MODEL.vocab
    per_sequence = (
        vocab * (torch.bfloat16.itemsize + 2 * torch.float32.itemsize) + vocab * torch.int32.itemsize
    )
    assert extra == 128 * per_sequence


def test_the_reserve_holds_non_torch_memory_and_grows_with_the_rope_table():
    assert reserve(eager=True) > NON_TORCH_BYTES
    longer = dataclasses.replace(
        PUBLISHED_TEXT_MODEL, max_position_embeddings=2 * PUBLISHED_TEXT_MODEL.max_position_embeddings
    )
    settings = dict(
        tensor_parallel=1, pipeline_parallel=1, max_num_batched_tokens=64, max_num_seqs=64, eager=True
    )
    assert reserve_bytes(longer, **settings) > reserve_bytes(PUBLISHED_TEXT_MODEL, **settings)


@pytest.mark.parametrize(("gpu_memory_gib", "step_tokens"), [(70.0, 8192), (69.9, 2048), (139.8, 8192)])
def test_the_step_budget_is_vllms_default_for_the_gpus_memory(gpu_memory_gib, step_tokens):
    # vLLM 0.32's API-server default (engine/arg_utils.py): 8,192 tokens a step on GPUs of 70 GiB
    # or more (up to 160 GiB), 2,048 below. (vLLM also gives A100s 2,048; the planner does not.)
    layout = get_layout("1gpu")
    assert plan_layout(layout, gpu_memory_gib=gpu_memory_gib) == plan_layout(
        layout, gpu_memory_gib=gpu_memory_gib, max_num_batched_tokens=step_tokens
    )


@pytest.mark.parametrize(("spare_blocks", "fits"), [(1, True), (0, False)])
def test_a_replica_fits_when_its_kv_cache_holds_one_request_and_vllms_null_block(spare_blocks, fits):
    # A 1gpu plan whose whole GPU is its budget: weights, reserve and an exact number of blocks.
    model, block_size, max_model_len = PUBLISHED_TEXT_MODEL, 16, 262144
    weights = weight_bytes(model, VARIANTS["instruct"], model.layers, embeddings=1, tensor_parallel=1)
    settings = dict(max_num_batched_tokens=2048, max_num_seqs=64, eager=False)
    reserved = reserve_bytes(model, tensor_parallel=1, pipeline_parallel=1, **settings)
    blocks = math.ceil(max_model_len / block_size) + spare_blocks
    total = weights + reserved + blocks * model.layers * vllm_page_bytes(model, block_size, 1)
    plan = plan_layout(
        get_layout("1gpu"),
        gpu_memory_gib=total / 1024**3,
        gpu_memory_utilization=1.0,
        max_model_len=max_model_len,
        **settings,
    )
    assert plan.ranks[0].kv_blocks == blocks
    assert plan.fits is fits
    if not fits:
        assert (plan.kv_tokens_per_replica, plan.max_concurrency_per_replica, plan.max_concurrency) == (
            0,
            0,
            0,
        )


def test_concurrency_is_given_to_two_decimals_as_vllm_logs_it():
    for plan in h100_plans():
        assert plan.max_concurrency_per_replica == round(plan.max_concurrency_per_replica, 2)
        assert plan.max_concurrency == round(plan.max_concurrency, 2)


def test_a_layout_is_checked_against_the_model_it_plans_for():
    demo = TextModel.from_config(build_config("instruct")["text_config"])  # 2 KV heads
    too_wide = plan_layout(get_layout("4gpu-tp"), gpu_memory_gib=80, model=demo, max_model_len=4096)
    assert not too_wide.fits and "the 2 KV heads" in too_wide.reason


def test_a_tied_head_shares_the_embedding_on_one_gpu_and_is_copied_across_stages(published_parameters):
    # BF16 throughout: every weight is two bytes.
    layers, embedding = published_parameters["linear"], published_parameters["embedding"]
    norms = published_parameters["layer_norm"]
    per_layer_bytes = (layers + norms) * 2 // PUBLISHED_TEXT_MODEL.layers
    gib = 1024**3

    def weights_gib(name, model=PUBLISHED_TEXT_MODEL):
        plan = plan_layout(get_layout(name), gpu_memory_gib=80, variant="instruct-bf16", model=model)
        return [rank.weights_gib for rank in plan.ranks], [rank.layers for rank in plan.ranks]

    (one,), _ = weights_gib("1gpu")
    assert one == pytest.approx((26 * per_layer_bytes + embedding * 2) / gib, abs=1e-3)
    untied = dataclasses.replace(PUBLISHED_TEXT_MODEL, tied_embeddings=False)
    (one_untied,), _ = weights_gib("1gpu", untied)
    assert one_untied == pytest.approx((26 * per_layer_bytes + 2 * embedding * 2) / gib, abs=1e-3)
    # Pipeline stages: the embedding on the first, the (copied) head on the last, none between.
    for name in ("2gpu-pp", "3gpu-pp"):
        stages, stage_layers = weights_gib(name)
        ends = [1] + [0] * (len(stages) - 2) + [1]
        expected = [
            (n * per_layer_bytes + end * embedding * 2) / gib
            for n, end in zip(stage_layers, ends, strict=True)
        ]
        assert stages == pytest.approx(expected, abs=1e-3)


def test_the_table_has_a_row_per_plan_with_its_figures_or_why_it_does_not_fit():
    plans = plan_all(gpu_memory_gib=GPU_MEMORY_GIB["L4"], max_model_len=262144)
    table = format_table(plans, gpu_label="L4 GPUs").splitlines()
    assert (
        table[0]
        == f"Ministral 3 3B on L4 GPUs ({GPU_MEMORY_GIB['L4']:g} GiB per GPU), 262,144 tokens per request"
    )
    assert table[1].split() == [
        "GPUs",
        "layout",
        "decoder",
        "max",
        "concurrency",
        "KV",
        "tokens/replica",
        "note",
    ]
    assert len(table) == 2 + len(plans)
    assert any(plan.fits for plan in plans) and not all(plan.fits for plan in plans)
    for plan, row in zip(plans, table[2:], strict=True):
        assert row.split()[:3] == [str(plan.gpus), plan.layout, *plan.shape.split()[:1]]
        if plan.fits:
            assert row.rstrip().endswith(f"{plan.max_concurrency:.2f}x  {plan.kv_tokens_per_replica:>18,}")
        else:
            assert f" -  {'-':>18}  does not fit: {plan.reason}" in row


def test_the_table_of_one_layout():
    plan = plan_layout(get_layout("2gpu-tp"), gpu_memory_gib=80)
    table = format_table([plan], gpu_label="GPUs").splitlines()
    assert table[0].startswith("Ministral 3 3B on GPUs (80 GiB per GPU), 262,144 tokens per request")
    assert len(table) == 3 and table[2].split()[1] == "2gpu-tp"


@pytest.mark.parametrize("name", ["3gpu-pp", "4gpu-pp"])
def test_a_model_of_fewer_layers_than_pipeline_stages_does_not_fit_and_breaks_nothing(name):
    # The demo checkpoint's shape: 2 layers, which a 3- or 4-stage pipeline cannot split.
    two_layers = dataclasses.replace(PUBLISHED_TEXT_MODEL, layers=2)
    plan = plan_layout(LAYOUTS[name], gpu_memory_gib=80, model=two_layers, max_model_len=4096)
    assert not plan.fits
    assert "2 layers" in plan.reason
    assert plan.kv_tokens_per_replica == 0
