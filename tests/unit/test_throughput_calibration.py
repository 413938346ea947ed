"""The decode model of serve/throughput.py against published measurements (docs/capacity.md).

Each row is one published single-stream (batch 1, concurrency 1) decode figure of a dense model
served by vLLM on one GPU of the catalogue; the model, given that model's architecture, must land
within ±30% of it. The step's two decode constants (ACHIEVABLE_BANDWIDTH_FRACTION and
DECODE_STEP_OVERHEAD_S) are the least-squares fit to this table, and a test refits them.
Measurements that cannot be compared, and why, are listed in docs/capacity.md, not here.
"""

from dataclasses import dataclass

import pytest

from serve.capacity import GPU_SPECS, VARIANTS, TextModel, weight_bytes
from serve.throughput import (
    ACHIEVABLE_BANDWIDTH_FRACTION,
    DECODE_STEP_OVERHEAD_S,
    DecoderReplica,
    RequestShape,
    decode_step,
    kv_bytes_read,
)

TOLERANCE = 0.30

# The reference models' text_config, from their config.json on Hugging Face
# (https://huggingface.co/<name>/blob/main/config.json). Copies of those files read for this table:
# Qwen2.5-3B, -7B, -14B, -32B, Qwen3-4B and Llama-3.1-8B in github.com/citsjtu2020/LLM-Prof,
# sglang/Model_Config.md; Qwen2(.5)-0.5B in github.com/rwth-i6/i6_experiments,
# users/juanola/experiments/e25_11_13_ctc/configurations/qwen2/qwen2_configs.py; Qwen2.5-1.5B's
# layers and heads in github.com/ZHUI/paddlenlp_model_readme, Qwen/Qwen2.5-Coder-1.5B/index.md.
# head_dim is hidden / heads where the config has none. Qwen2.5's q/k/v biases (a few thousand
# weights a layer) and Qwen3's q/k norms are left out: they do not change the bytes a step reads.
QWEN25_05B = TextModel(
    layers=24,
    hidden=896,
    intermediate=4864,
    heads=14,
    kv_heads=2,
    head_dim=64,
    vocab=151936,
    tied_embeddings=True,
    max_position_embeddings=32768,
)
QWEN25_15B = TextModel(
    layers=28,
    hidden=1536,
    intermediate=8960,
    heads=12,
    kv_heads=2,
    head_dim=128,
    vocab=151936,
    tied_embeddings=True,
    max_position_embeddings=32768,
)
QWEN25_3B = TextModel(
    layers=36,
    hidden=2048,
    intermediate=11008,
    heads=16,
    kv_heads=2,
    head_dim=128,
    vocab=151936,
    tied_embeddings=True,
    max_position_embeddings=32768,
)
QWEN25_7B = TextModel(
    layers=28,
    hidden=3584,
    intermediate=18944,
    heads=28,
    kv_heads=4,
    head_dim=128,
    vocab=152064,
    tied_embeddings=False,
    max_position_embeddings=131072,
)
QWEN25_14B = TextModel(
    layers=48,
    hidden=5120,
    intermediate=13824,
    heads=40,
    kv_heads=8,
    head_dim=128,
    vocab=152064,
    tied_embeddings=False,
    max_position_embeddings=131072,
)
QWEN25_32B = TextModel(
    layers=64,
    hidden=5120,
    intermediate=27648,
    heads=40,
    kv_heads=8,
    head_dim=128,
    vocab=152064,
    tied_embeddings=False,
    max_position_embeddings=131072,
)
QWEN3_4B = TextModel(
    layers=36,
    hidden=2560,
    intermediate=9728,
    heads=32,
    kv_heads=8,
    head_dim=128,
    vocab=151936,
    tied_embeddings=True,
    max_position_embeddings=40960,
)
LLAMA31_8B = TextModel(
    layers=32,
    hidden=4096,
    intermediate=14336,
    heads=32,
    kv_heads=8,
    head_dim=128,
    vocab=128256,
    tied_embeddings=False,
    max_position_embeddings=131072,
)

# VARIANTS name Ministral's checkpoints; only their bytes per linear weight are used here (BF16:
# 2, FP8: 1, with the embedding and output head in BF16 either way, as FP8 checkpoints keep them).
WEIGHTS = {"bf16": "instruct-bf16", "fp8": "instruct"}

QWEN25_SPEED = "https://qwen.readthedocs.io/en/v2.5/benchmark/speed_benchmark.html"
QWEN25_SPEED_WORKLOAD = "vLLM 0.6.3, batch 1, 1-token prompt, 2048 generated tokens"


@dataclass(frozen=True)
class Measurement:
    source: str
    name: str  # the model as published
    model: TextModel
    gpu: str  # in the catalogue (serve/capacity.py GPU_SPECS)
    weights: str  # a WEIGHTS key
    workload: str
    prompt_tokens: int
    output_tokens: int
    tokens_per_s: float  # decode tokens/s of the one stream, as published

    @property
    def parameters(self) -> int:
        m = self.model
        embeddings = m.vocab * m.hidden * (1 if m.tied_embeddings else 2)
        return m.layers * m.layer_linear_params() + embeddings

    def replica(self) -> DecoderReplica:
        return DecoderReplica(self.gpu, variant=WEIGHTS[self.weights], model=self.model)

    def context(self) -> int:
        return RequestShape(self.prompt_tokens, self.output_tokens).mean_context

    def modelled_tokens_per_s(self) -> float:
        return 1 / decode_step(self.replica(), 1, self.context()).seconds

    def read_seconds(self) -> float:
        """What one step reads (weights and the stream's KV cache), at the datasheet bandwidth."""
        model, layers = self.model, self.model.layers
        reads = weight_bytes(
            model, VARIANTS[WEIGHTS[self.weights]], layers, embeddings=1, tensor_parallel=1
        ) + kv_bytes_read(model, layers, 1, self.context(), 1)
        return reads / (GPU_SPECS[self.gpu].memory_bandwidth_gb_s * 1e9)


def qwen25_speed(name: str, model: TextModel, tokens_per_s: float) -> Measurement:
    """A row of the BF16 vLLM table of the Qwen2.5 speed benchmark, one A100 80GB."""
    return Measurement(
        QWEN25_SPEED, name, model, "A100-80GB", "bf16", QWEN25_SPEED_WORKLOAD, 1, 2048, tokens_per_s
    )


MEASUREMENTS = [
    # M1. The A100 80GB's form factor is not stated; the catalogue's is the SXM4 (2,039 GB/s).
    qwen25_speed("Qwen2.5-3B-Instruct", QWEN25_3B, 127.61),
    # M3. Tenstorrent's GPU reference run (vLLM), TPOT 10.5 ms at ISL/OSL 128/128, c=1; the dtype is
    # not stated (16-bit either way: the same bytes).
    Measurement(
        "https://github.com/tenstorrent/tt-inference-server/issues/394",
        "Qwen3-4B",
        QWEN3_4B,
        "RTX4090",
        "bf16",
        "vLLM (version not stated), 128 in / 128 out, concurrency 1",
        128,
        128,
        1 / 10.5e-3,
    ),
    # M4. "~138 TPS flat from 240 -> 300 W", single stream; lengths not stated, modelled at 128/128
    # (at a 1,000-token prompt the model is 2% slower).
    Measurement(
        "https://github.com/noonghunna/club-3090/issues/697",
        "Qwen3-4B-Instruct-2507-FP8",
        QWEN3_4B,
        "RTX4090",
        "fp8",
        "vLLM (version not stated), single stream",
        128,
        128,
        138,
    ),
    # M1b: the same page's other sizes, which separate the per-byte and per-step costs.
    qwen25_speed("Qwen2.5-0.5B-Instruct", QWEN25_05B, 311.55),
    qwen25_speed("Qwen2.5-1.5B-Instruct", QWEN25_15B, 183.33),
    qwen25_speed("Qwen2.5-7B-Instruct", QWEN25_7B, 84.28),
    qwen25_speed("Qwen2.5-14B-Instruct", QWEN25_14B, 46.30),
    qwen25_speed("Qwen2.5-32B-Instruct", QWEN25_32B, 22.13),
    # R3. "decode at one request per time runs at about 75 tokens/sec"; A100 40GB (SXM4, 1,555 GB/s).
    Measurement(
        "https://johnmusgrave.com/p/vllm-throughput-latency-sweep-on",
        "Llama-3.1-8B-Instruct",
        LLAMA31_8B,
        "A100-40GB",
        "bf16",
        "vLLM 0.23.0, vllm bench serve, random 1024 in / 128 out, --ignore-eos, concurrency 1",
        1024,
        128,
        75,
    ),
]


def row_id(row: Measurement) -> str:
    return f"{row.name}-{row.gpu}"


@pytest.mark.parametrize("row", MEASUREMENTS, ids=row_id)
def test_single_stream_decode_is_within_30_percent_of_the_published_figure(row):
    modelled = row.modelled_tokens_per_s()
    assert modelled == pytest.approx(row.tokens_per_s, rel=TOLERANCE), (
        f"{row.name} on {row.gpu}: modelled {modelled:.1f} tok/s, published {row.tokens_per_s:.1f} "
        f"({row.source})"
    )


def test_at_least_three_rows_are_3_to_4b_models_with_their_sources():
    assert all(row.source.startswith("https://") for row in MEASUREMENTS)
    assert len({row.name for row in MEASUREMENTS if 3e9 <= row.parameters < 4.5e9}) >= 3


@pytest.mark.parametrize("row", MEASUREMENTS, ids=row_id)
def test_one_stream_is_the_overhead_and_its_reads_at_the_fitted_bandwidth(row):
    # What the fit below relies on: at batch 1 the step reads, it does not compute.
    step = decode_step(row.replica(), 1, row.context()).seconds
    assert step == pytest.approx(
        DECODE_STEP_OVERHEAD_S + row.read_seconds() / ACHIEVABLE_BANDWIDTH_FRACTION, rel=1e-9
    )


def fit_decode_constants(rows: list[Measurement]) -> tuple[float, float]:
    """(bandwidth fraction, step overhead) minimising the squared relative error of the modelled
    time per output token, overhead + read_seconds / fraction, against the published one: a
    linear least-squares problem in (overhead, 1 / fraction), solved by its normal equations."""
    a = [row.tokens_per_s for row in rows]  # 1 / published seconds per token
    b = [row.read_seconds() * row.tokens_per_s for row in rows]
    aa, ab, bb = sum(x * x for x in a), sum(x * y for x, y in zip(a, b, strict=True)), sum(y * y for y in b)
    determinant = aa * bb - ab * ab
    overhead = (bb * sum(a) - ab * sum(b)) / determinant
    inverse_fraction = (aa * sum(b) - ab * sum(a)) / determinant
    return 1 / inverse_fraction, overhead


def test_the_decode_constants_are_the_least_squares_fit_to_the_table():
    fraction, overhead = fit_decode_constants(MEASUREMENTS)
    # serve/throughput.py writes them rounded: to two decimals, and to 10 microseconds.
    assert fraction == pytest.approx(ACHIEVABLE_BANDWIDTH_FRACTION, abs=0.005)
    assert overhead == pytest.approx(DECODE_STEP_OVERHEAD_S, abs=5e-6)
    assert 0 < fraction <= 1 and overhead > 0
