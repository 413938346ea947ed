"""Capacity planner: what each layout holds on a given GPU, before anyone rents it.

The accounting follows vLLM 0.32, per GPU (= per rank):

    budget      = gpu_memory_utilization x GPU memory            (v1/worker/utils.py request_memory)
    kv_bytes    = budget - weights - reserve                     (v1/worker/gpu_worker.py)
    page        = 2 x block_size x kv_heads_per_rank x head_dim x kv_dtype_bytes   (per layer)
    num_blocks  = min over ranks of kv_bytes // (layers_on_rank x page)            (kv_cache_utils.py)
    concurrency = num_blocks / ceil(max_model_len / block_size)
    kv_tokens   = int(concurrency x max_model_len)

`concurrency` and `kv_tokens` are exactly what vLLM logs at start-up ("KV cache
size: N tokens, Maximum concurrency for L tokens per request: Cx"); the
second half of the arithmetic (bytes -> blocks -> tokens) is vLLM's own and
is checked against a running engine. The first half has one estimate:
vLLM *measures* its activation/profiling reserve (the peak of a profile run,
CUDA graphs, non-torch allocations) at start-up; `reserve_bytes` estimates it
from the batch shape, and says so. Weights are the decoder's only: the
vision encoder is its own deployment (on a shared card, its share is what
the layout keeps out of `gpu_memory_utilization`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from serve.layouts import LAYOUTS, Layout, LayoutError, check_shape

GIB = 1024**3

# Total memory torch reports for common GPUs, in GiB (the "GB class" on rental pages).
GPU_MEMORY_GIB: dict[str, float] = {
    "T4": 14.6,
    "A10G": 22.0,
    "L4": 22.0,
    "RTX4090": 23.6,
    "A100-40GB": 39.4,
    "L40S": 44.4,
    "A6000": 47.5,
    "A100-80GB": 79.1,
    "H100": 79.1,
    "H100-NVL": 93.1,
    "GH200": 94.5,
    "H200": 139.8,
}


@dataclass(frozen=True)
class GPUSpec:
    """A card's datasheet figures that throughput depends on (serve/throughput.py).

    Tensor-core peaks are dense: vendors headline 2:4 sparsity, twice these.
    Link figures are both directions together, as vendors quote them.
    """

    memory_bandwidth_gb_s: float
    # BF16 tensor cores; the T4 has no BF16, and vLLM runs it in FP16, whose figure this is.
    dense_bf16_tflops: float
    # None: no FP8 tensor cores (vLLM runs FP8 weights there as weight-only FP8, in BF16 maths).
    dense_fp8_tflops: float | None
    pcie_gb_s: float
    # GPU-to-GPU NVLink of one GPU; None: the GPUs talk over PCIe.
    nvlink_gb_s: float | None
    # GPUs one NVLink domain joins (an HGX board: 8; a bridge or NVL2: 2); beyond it, PCIe.
    nvlink_gpus: int
    source: str


H100_PAGE = "https://www.nvidia.com/en-us/data-center/h100/"
A100_DATASHEET = (
    "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
    "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf"
)

# One entry per GPU_MEMORY_GIB name (a test keeps the two tables in step). Hopper's dense
# peaks (989.4 BF16, 1,978.9 FP8) are the Hopper whitepaper's; its pages quote twice them.
GPU_SPECS: dict[str, GPUSpec] = {
    "T4": GPUSpec(
        memory_bandwidth_gb_s=320,
        dense_bf16_tflops=65,
        dense_fp8_tflops=None,
        pcie_gb_s=32,
        nvlink_gb_s=None,
        nvlink_gpus=1,
        source="https://www.nvidia.com/en-us/data-center/tesla-t4/",
    ),
    # AWS's variant of the A10 (G5 instances), without an NVIDIA datasheet: the A10's memory, and
    # tensor cores at the GeForce rate (70 TFLOPS BF16 dense, against the A10's 125).
    "A10G": GPUSpec(
        memory_bandwidth_gb_s=600,
        dense_bf16_tflops=70,
        dense_fp8_tflops=None,
        pcie_gb_s=64,
        nvlink_gb_s=None,
        nvlink_gpus=1,
        source="https://www.baseten.co/blog/nvidia-a10-vs-a10g-for-ml-model-inference/",
    ),
    "L4": GPUSpec(
        memory_bandwidth_gb_s=300,
        dense_bf16_tflops=121,
        dense_fp8_tflops=242.5,
        pcie_gb_s=64,
        nvlink_gb_s=None,
        nvlink_gpus=1,
        source="https://www.nvidia.com/en-us/data-center/l4/",
    ),
    # GeForce: FP32-accumulate tensor maths at half the FP16-accumulate rate; the figures vLLM gets.
    "RTX4090": GPUSpec(
        memory_bandwidth_gb_s=1008,
        dense_bf16_tflops=165.2,
        dense_fp8_tflops=330.3,
        pcie_gb_s=64,
        nvlink_gb_s=None,
        nvlink_gpus=1,
        source="https://images.nvidia.com/aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf",
    ),
    # The SXM4 module (e.g. AWS p4d), on an HGX board.
    "A100-40GB": GPUSpec(
        memory_bandwidth_gb_s=1555,
        dense_bf16_tflops=312,
        dense_fp8_tflops=None,
        pcie_gb_s=64,
        nvlink_gb_s=600,
        nvlink_gpus=8,
        source=A100_DATASHEET,
    ),
    "L40S": GPUSpec(
        memory_bandwidth_gb_s=864,
        dense_bf16_tflops=362.05,
        dense_fp8_tflops=733,
        pcie_gb_s=64,
        nvlink_gb_s=None,
        nvlink_gpus=1,
        source="https://www.nvidia.com/en-us/data-center/l40s/",
    ),
    # A two-card NVLink bridge (112.5 GB/s) exists; rented machines rarely carry one.
    "A6000": GPUSpec(
        memory_bandwidth_gb_s=768,
        dense_bf16_tflops=154.8,
        dense_fp8_tflops=None,
        pcie_gb_s=64,
        nvlink_gb_s=None,
        nvlink_gpus=1,
        source="https://www.nvidia.com/en-us/design-visualization/rtx-a6000/",
    ),
    "A100-80GB": GPUSpec(
        memory_bandwidth_gb_s=2039,
        dense_bf16_tflops=312,
        dense_fp8_tflops=None,
        pcie_gb_s=64,
        nvlink_gb_s=600,
        nvlink_gpus=8,
        source=A100_DATASHEET,
    ),
    "H100": GPUSpec(
        memory_bandwidth_gb_s=3350,
        dense_bf16_tflops=989.4,
        dense_fp8_tflops=1978.9,
        pcie_gb_s=128,
        nvlink_gb_s=900,
        nvlink_gpus=8,
        source=H100_PAGE,
    ),
    # PCIe cards joined in pairs by NVLink bridges.
    "H100-NVL": GPUSpec(
        memory_bandwidth_gb_s=3900,
        dense_bf16_tflops=835.5,
        dense_fp8_tflops=1670.5,
        pcie_gb_s=128,
        nvlink_gb_s=600,
        nvlink_gpus=2,
        source=H100_PAGE,
    ),
    # The 96 GB HBM3 superchip; two join over NVLink as GH200 NVL2, more over the network.
    "GH200": GPUSpec(
        memory_bandwidth_gb_s=4000,
        dense_bf16_tflops=989.4,
        dense_fp8_tflops=1978.9,
        pcie_gb_s=128,
        nvlink_gb_s=900,
        nvlink_gpus=2,
        source="https://www.nvidia.com/en-us/data-center/grace-hopper-superchip/",
    ),
    "H200": GPUSpec(
        memory_bandwidth_gb_s=4800,
        dense_bf16_tflops=989.4,
        dense_fp8_tflops=1978.9,
        pcie_gb_s=128,
        nvlink_gb_s=900,
        nvlink_gpus=8,
        source="https://www.nvidia.com/en-us/data-center/h200/",
    ),
}

# Estimates of what vLLM measures at start-up, per GPU (see reserve_bytes).
NON_TORCH_BYTES = int(0.5 * GIB)  # cuBLAS/cuBLASLt workspaces, allocator slack
NCCL_BYTES_PER_PEER = int(0.125 * GIB)  # collective buffers of a multi-GPU engine
CUDA_GRAPH_BYTES = int(0.5 * GIB)  # captured graphs, when not eager
# vLLM's default token budget per step on 70+ GiB GPUs (smaller ones: 2048).
DEFAULT_BATCHED_TOKENS_LARGE_GPU = 8192
DEFAULT_BATCHED_TOKENS = 2048
LARGE_GPU_GIB = 70


@dataclass(frozen=True)
class TextModel:
    """The dimensions of a Ministral 3 language model that memory depends on."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    max_position_embeddings: int

    @classmethod
    def from_config(cls, text_config: dict) -> TextModel:
        return cls(
            layers=text_config["num_hidden_layers"],
            hidden=text_config["hidden_size"],
            intermediate=text_config["intermediate_size"],
            heads=text_config["num_attention_heads"],
            kv_heads=text_config["num_key_value_heads"],
            head_dim=text_config.get("head_dim")
            or text_config["hidden_size"] // text_config["num_attention_heads"],
            vocab=text_config["vocab_size"],
            tied_embeddings=text_config.get("tie_word_embeddings", False),
            max_position_embeddings=text_config["max_position_embeddings"],
        )

    def kv_heads_per_rank(self, tensor_parallel: int) -> int:
        # Fewer KV heads than ranks: vLLM replicates them, one per rank.
        return max(1, self.kv_heads // tensor_parallel)

    def kv_bytes_per_token(self, tensor_parallel: int = 1, dtype_bytes: int = 2) -> int:
        """KV cache bytes of one token on one GPU holding all layers."""
        return self.layers * self.kv_page_bytes(1, tensor_parallel, dtype_bytes)

    def kv_page_bytes(self, block_size: int, tensor_parallel: int = 1, dtype_bytes: int = 2) -> int:
        """One layer's KV block on one rank: keys and values of `block_size` tokens."""
        return 2 * block_size * self.kv_heads_per_rank(tensor_parallel) * self.head_dim * dtype_bytes

    def layer_linear_params(self) -> int:
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return attention + 3 * self.hidden * self.intermediate


# mistralai/Ministral-3-3B-{Instruct,Reasoning}-2512 (text_config of config.json).
PUBLISHED_TEXT_MODEL = TextModel(
    layers=26,
    hidden=3072,
    intermediate=9216,
    heads=32,
    kv_heads=8,
    head_dim=128,
    vocab=131072,
    tied_embeddings=True,
    max_position_embeddings=262144,
)


@dataclass(frozen=True)
class Variant:
    checkpoint: str
    # Bytes per weight of the decoder's linear layers (FP8: 1); embeddings,
    # norms and the KV cache stay in bfloat16 either way.
    linear_weight_bytes: int


VARIANTS: dict[str, Variant] = {
    "instruct": Variant("mistralai/Ministral-3-3B-Instruct-2512", linear_weight_bytes=1),
    "instruct-bf16": Variant("mistralai/Ministral-3-3B-Instruct-2512-BF16", linear_weight_bytes=2),
    "reasoning": Variant("mistralai/Ministral-3-3B-Reasoning-2512", linear_weight_bytes=2),
}


def pipeline_partition(layers: int, pipeline_parallel: int) -> list[int]:
    """Layers per pipeline stage, as vLLM splits them (distributed/utils.py get_pp_indices)."""
    partition = [layers // pipeline_parallel] * pipeline_parallel
    # The remainder goes to the stages before the last (which holds the final norm).
    for i in range(2, layers % pipeline_parallel + 2):
        partition[-i] += 1
    return partition


def weight_bytes(
    model: TextModel, variant: Variant, layers: int, *, embeddings: int, tensor_parallel: int
) -> int:
    """Weights of one rank: its layers' linears (sharded by TP) and its embedding matrices."""
    dtype_bytes = 2
    linears = layers * model.layer_linear_params() * variant.linear_weight_bytes
    norms = layers * 2 * model.hidden * dtype_bytes
    embedding = embeddings * model.vocab * model.hidden * dtype_bytes
    return (linears + embedding) // tensor_parallel + norms


def reserve_bytes(
    model: TextModel,
    *,
    tensor_parallel: int,
    pipeline_parallel: int,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    eager: bool,
) -> int:
    """Estimate of what vLLM's start-up profiling keeps out of the KV cache on one rank.

    The peak of the profile run: the MLP activations of a full step
    (gate_up and its SiLU product, bf16, sharded by TP) or the sampler's
    logits for min(T, S) sequences over the whole vocabulary (bf16 logits,
    an fp32 copy and the probabilities), whichever is larger; the sampler's
    per-sequence token counts (S x vocab x int32); the RoPE table; non-torch
    memory, collective buffers with TP/PP peers, and CUDA graphs.
    """
    rows = min(max_num_batched_tokens, max_num_seqs)
    mlp = max_num_batched_tokens * 3 * model.intermediate * 2 // tensor_parallel
    sampler = rows * model.vocab * (2 + 4 + 4)
    token_counts = max_num_seqs * model.vocab * 4
    rope = model.max_position_embeddings * model.head_dim * 2 * 2
    peers = NCCL_BYTES_PER_PEER if tensor_parallel > 1 or pipeline_parallel > 1 else 0
    return (
        max(mlp, sampler) + token_counts + rope + NON_TORCH_BYTES + peers + (0 if eager else CUDA_GRAPH_BYTES)
    )


@dataclass(frozen=True)
class RankMemory:
    layers: int
    weights_gib: float
    reserve_gib: float
    kv_cache_gib: float
    kv_blocks: int


@dataclass(frozen=True)
class Plan:
    layout: str
    gpus: int
    shape: str
    gpu_memory_gib: float
    gpu_memory_utilization: float
    max_model_len: int
    fits: bool
    reason: str
    kv_bytes_per_token: int  # on one GPU holding all layers (TP-sharded)
    kv_tokens_per_replica: int
    max_concurrency_per_replica: float  # what vLLM logs at start-up
    max_concurrency: float  # all decoder replicas of the layout
    ranks: list[RankMemory]

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class KVCapacity:
    blocks: int
    max_concurrency: float  # requests of max_model_len tokens
    tokens: int


def kv_capacity(
    model: TextModel,
    kv_bytes_per_rank: list[int],
    *,
    tensor_parallel: int,
    max_model_len: int,
    block_size: int,
    kv_dtype_bytes: int = 2,
) -> KVCapacity:
    """vLLM's kv_cache_utils arithmetic: KV bytes of each rank (pipeline order) -> capacity."""
    layers = pipeline_partition(model.layers, len(kv_bytes_per_rank))
    page = model.kv_page_bytes(block_size, tensor_parallel, kv_dtype_bytes)
    # A stage without layers (a model of fewer layers than stages, refused by check_shape) holds no KV.
    blocks = max(
        0, min((kv // (n * page) for kv, n in zip(kv_bytes_per_rank, layers, strict=True) if n), default=0)
    )
    concurrency = blocks / math.ceil(max_model_len / block_size)
    return KVCapacity(blocks=blocks, max_concurrency=concurrency, tokens=int(concurrency * max_model_len))


def plan_layout(
    layout: Layout,
    *,
    gpu_memory_gib: float,
    variant: str = "instruct",
    model: TextModel = PUBLISHED_TEXT_MODEL,
    max_model_len: int = 262144,
    gpu_memory_utilization: float | None = None,
    max_num_seqs: int = 64,
    max_num_batched_tokens: int | None = None,
    block_size: int = 16,
    eager: bool = False,
    gpus_per_node: int | None = None,
) -> Plan:
    tp, pp = layout.tensor_parallel, layout.pipeline_parallel
    utilization = gpu_memory_utilization or layout.gpu_memory_utilization
    if max_num_batched_tokens is None:
        large = gpu_memory_gib >= LARGE_GPU_GIB
        max_num_batched_tokens = DEFAULT_BATCHED_TOKENS_LARGE_GPU if large else DEFAULT_BATCHED_TOKENS
    reason = ""
    try:
        check_shape(
            tp,
            pp,
            attention_heads=model.heads,
            kv_heads=model.kv_heads,
            layers=model.layers,
            gpus_per_node=gpus_per_node,
        )
    except LayoutError as e:
        reason = str(e)
    if max_model_len > model.max_position_embeddings:
        reason = (
            reason or f"max_model_len {max_model_len} exceeds the model's {model.max_position_embeddings}"
        )

    partition = pipeline_partition(model.layers, pp)
    page = model.kv_page_bytes(block_size, tp)
    budget = int(utilization * gpu_memory_gib * GIB)
    reserve = reserve_bytes(
        model,
        tensor_parallel=tp,
        pipeline_parallel=pp,
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=max_num_seqs,
        eager=eager,
    )
    kv_per_rank, ranks = [], []
    for stage, layers in enumerate(partition):
        # Input embedding on the first stage, output head on the last; a tied
        # head shares the matrix when both are on one GPU, and copies it otherwise.
        if pp == 1:
            embeddings = 1 if model.tied_embeddings else 2
        else:
            embeddings = int(stage == 0) + int(stage == pp - 1)
        weights = weight_bytes(model, VARIANTS[variant], layers, embeddings=embeddings, tensor_parallel=tp)
        kv_bytes = max(budget - weights - reserve, 0)
        kv_per_rank.append(kv_bytes)
        ranks.append(
            RankMemory(
                layers=layers,
                weights_gib=round(weights / GIB, 3),
                reserve_gib=round(reserve / GIB, 3),
                kv_cache_gib=round(kv_bytes / GIB, 3),
                kv_blocks=kv_bytes // (layers * page) if layers else 0,
            )
        )
    capacity = kv_capacity(
        model, kv_per_rank, tensor_parallel=tp, max_model_len=max_model_len, block_size=block_size
    )
    blocks, concurrency, tokens = capacity.blocks, capacity.max_concurrency, capacity.tokens
    # vLLM keeps one block back (the null block) and wants one whole request to fit.
    if not reason and blocks - 1 < math.ceil(max_model_len / block_size):
        reason = f"the KV cache holds {tokens:,} tokens, less than one request of {max_model_len:,}"
    fits = not reason
    return Plan(
        layout=layout.name,
        gpus=layout.gpus,
        shape=layout.shape,
        gpu_memory_gib=gpu_memory_gib,
        gpu_memory_utilization=utilization,
        max_model_len=max_model_len,
        fits=fits,
        reason=reason,
        kv_bytes_per_token=model.kv_bytes_per_token(tp),
        kv_tokens_per_replica=tokens if fits else 0,
        max_concurrency_per_replica=round(concurrency, 2) if fits else 0.0,
        max_concurrency=round(concurrency * layout.decoder_replicas, 2) if fits else 0.0,
        ranks=ranks,
    )


def plan_all(**kwargs) -> list[Plan]:
    return [plan_layout(layout, **kwargs) for layout in LAYOUTS.values()]


def format_table(plans: list[Plan], *, gpu_label: str) -> str:
    """The rental-page view: one row per layout."""
    first = plans[0]
    header = (
        f"Ministral 3 3B on {gpu_label} ({first.gpu_memory_gib:g} GiB per GPU), "
        f"{first.max_model_len:,} tokens per request\n"
    )
    columns = ("GPUs", "layout", "decoder", "max concurrency", "KV tokens/replica")
    rows = ["{:>4}  {:<18} {:<12} {:>16}  {:>18}  note".format(*columns)]
    for plan in plans:
        concurrency = f"{plan.max_concurrency:.2f}x" if plan.fits else "-"
        tokens = f"{plan.kv_tokens_per_replica:,}" if plan.fits else "-"
        note = "" if plan.fits else f"does not fit: {plan.reason}"
        rows.append(
            f"{plan.gpus:>4}  {plan.layout:<18} {plan.shape:<12} {concurrency:>16}  {tokens:>18}  {note}"
        )
    return header + "\n".join(rows)
