"""Throughput model: tokens/s, time to first token and cost of each layout on a catalogue GPU.

The capacity planner's companion (serve/capacity.py says what fits; this says how fast it runs):
pure functions of the model's dimensions, the layout's shape and the GPU's datasheet figures
(capacity.GPU_SPECS). Every efficiency below is a named constant that calibration against
measured runs sets (docs/capacity.md); until then the figures are estimates, not measurements.

Decode. One step gives every running sequence one token; a batch of B sequences at the request's
mean context c = prompt + output / 2 is split into m = min(PP, B) microbatches of b = ceil(B / m):

    stage    = max(bytes / (bandwidth x ACHIEVABLE_BANDWIDTH_FRACTION),
                   flops / (peak x ACHIEVABLE_FLOPS_FRACTION)) + TP all-reduces
    bytes    = the stage's weights on one rank (its layers' linears / TP, the output head on the
               last stage) + b x c x the stage's KV cache bytes per token on one rank
    flops    = 2 x b x the stage's linear and head weights / TP + 4 x b x c x layers x heads / TP x head_dim
    all-reduce, 2 per layer, ring: latency + 2(TP-1)/TP x b x hidden x 2 bytes / (one-way link x fraction)
    step     = DECODE_STEP_OVERHEAD_S + max(sum of stages + (PP-1) hand-offs, m x slowest stage)
    tokens/s = B / step

One sequence passes every stage in turn, so PP gives single-stream decode no speed-up; a full
pipeline (m = PP microbatches) runs at its slowest stage. The peak is FP8's for FP8 weights on
cards that have it, else BF16's (FP8 weights there run weight-only).

Prefill of P prompt tokens, compute-bound (bound by its weight reads only for a short prompt):
2 x linear weights x P + 2 x layers x P^2 x heads x head_dim (causal QK^T and AV) + 2 x vocab x
hidden (the one sampled position), split over TP ranks, stages in turn (TP all-reduces and PP
hand-offs of P tokens included). TTFT = prefill + one decode step.

Load. A decoder replica at batch B serves r requests/s. Little's law (B = r x (TTFT + (O-1) x
TPOT)) with prefill taking its share of the GPU (TPOT = step / (1 - r x prefill)) gives

    prefill x TTFT x r^2 - (TTFT + (O-1) x step + B x prefill) x r + B = 0      (the smaller root)

The replica runs at the B (up to max_num_seqs and what its KV cache holds of P + O-token requests)
that serves the most requests while its TTFT and TPOT, times LATENCY_TAIL_FACTOR, meet the p95
targets (TTFT here: prefill + one step at batch B); a layout needs
ceil(RPS / (decoder replicas x r)) copies of itself. Options rank by dollars per hour, else by GPUs.

Cost. $/M output tokens = price per GPU-hour x the layout's GPUs / (tokens/s x 3600) x 1e6, at
decode tokens/s at full concurrency: a floor, prompt processing is not charged (--for-load counts it).

Vision encoder. Pixtral at an image's patch grid (patch convolution; per layer q, k, v, o, the
gated MLP and full attention over the image's patches) and the projector (patch merger, two-layer
MLP to the text hidden size), in BF16 (the FP8 checkpoint keeps the tower in BF16); an encoder
replica's share of a GPU = images/s x seconds per image.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from serve.capacity import (
    GPU_SPECS,
    PUBLISHED_TEXT_MODEL,
    VARIANTS,
    GPUSpec,
    Plan,
    TextModel,
    pipeline_partition,
    weight_bytes,
)
from serve.layouts import get_layout

# Calibration (docs/capacity.md). The decode step's two constants are fitted to nine published
# single-stream vLLM measurements (0.5B to 32B dense models on A100s and an RTX 4090; least squares
# on the relative error of the time per output token; tests/unit/test_throughput_calibration.py
# holds the table and refits it); the others are first estimates that no measurement has set yet.
# Share of the datasheet memory bandwidth a decode step's weight and KV reads reach (fitted).
ACHIEVABLE_BANDWIDTH_FRACTION = 0.84
# Share of the dense tensor-core peak that prefill's matrix products reach (model FLOPs utilisation).
ACHIEVABLE_FLOPS_FRACTION = 0.5
# Share of a link's one-way bandwidth a ring all-reduce or a stage hand-off reaches.
ACHIEVABLE_LINK_FRACTION = 0.7
# What a decode step costs besides the GPU's reads and maths: scheduling, input preparation,
# sampling, and launching the step's kernels, each with its fixed latency (fitted; at one stream
# it is over 40% of a 3-4B model's step on an A100).
DECODE_STEP_OVERHEAD_S = 2.84e-3
# Fixed cost of one small all-reduce: vLLM's custom all-reduce over NVLink, NCCL over PCIe.
NVLINK_COLLECTIVE_LATENCY_S = 8e-6
PCIE_COLLECTIVE_LATENCY_S = 25e-6
# Fixed cost of handing one microbatch's hidden states to the next pipeline stage.
PIPELINE_HANDOFF_LATENCY_S = 50e-6
# How far a p95 sits above the model's steady-state figure, for comparing with p95 targets.
LATENCY_TAIL_FACTOR = 1.25

ACTIVATION_BYTES = 2  # bfloat16 hidden states, in all-reduces and hand-offs
BLOCK_SIZE = 16  # vLLM's KV block on GPUs, as plan_layout's default


@dataclass(frozen=True)
class RequestShape:
    """A request's length: what its decode steps read and what the KV cache keeps for it."""

    prompt_tokens: int = 1000
    output_tokens: int = 200

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens

    @property
    def mean_context(self) -> int:
        """The context a decode step reads, averaged over the request's output."""
        return self.prompt_tokens + self.output_tokens // 2


@dataclass(frozen=True)
class DecoderReplica:
    """One decoder engine: its TP x PP shape on a catalogue GPU, with the weights it serves."""

    gpu: str
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    variant: str = "instruct"
    model: TextModel = PUBLISHED_TEXT_MODEL

    @property
    def spec(self) -> GPUSpec:
        return GPU_SPECS[self.gpu]

    @property
    def achievable_bytes_per_s(self) -> float:
        return self.spec.memory_bandwidth_gb_s * 1e9 * ACHIEVABLE_BANDWIDTH_FRACTION

    @property
    def achievable_flops_per_s(self) -> float:
        """FP8 weights use FP8 tensor cores where the card has them; elsewhere they run weight-only."""
        fp8 = self.spec.dense_fp8_tflops if VARIANTS[self.variant].linear_weight_bytes == 1 else None
        return (fp8 or self.spec.dense_bf16_tflops) * 1e12 * ACHIEVABLE_FLOPS_FRACTION


@dataclass(frozen=True)
class Link:
    one_way_bytes_per_s: float
    latency_s: float


def link_between(gpu: GPUSpec, gpus: int) -> Link:
    """What a group of `gpus` GPUs talks over: NVLink within one NVLink domain, else PCIe.

    Vendors quote both directions together; a ring sends and receives at once, each at half."""
    if gpu.nvlink_gb_s and gpus <= gpu.nvlink_gpus:
        return Link(gpu.nvlink_gb_s / 2 * 1e9 * ACHIEVABLE_LINK_FRACTION, NVLINK_COLLECTIVE_LATENCY_S)
    return Link(gpu.pcie_gb_s / 2 * 1e9 * ACHIEVABLE_LINK_FRACTION, PCIE_COLLECTIVE_LATENCY_S)


def all_reduce_seconds(payload_bytes: int, ranks: int, link: Link) -> float:
    """One ring all-reduce: each rank sends and receives 2(n-1)/n of the payload."""
    if ranks == 1:
        return 0.0
    return link.latency_s + 2 * (ranks - 1) / ranks * payload_bytes / link.one_way_bytes_per_s


def kv_bytes_read(model: TextModel, layers: int, sequences: int, context: int, tensor_parallel: int) -> int:
    """KV cache one rank reads in a step: every sequence's keys and values on its layers."""
    return sequences * context * layers * model.kv_page_bytes(1, tensor_parallel)


@dataclass(frozen=True)
class StageTime:
    seconds: float
    all_reduce_s: float


def _stage_time(replica: DecoderReplica, layers: int, *, reads: int, flops: float, tokens: int) -> StageTime:
    """A stage's forward on one rank: its reads or its maths, whichever takes longer, then its
    layers' two all-reduces each of `tokens` hidden states."""
    tp = replica.tensor_parallel
    payload = tokens * replica.model.hidden * ACTIVATION_BYTES
    reduces = layers * 2 * all_reduce_seconds(payload, tp, link_between(replica.spec, tp))
    return StageTime(
        max(reads / replica.achievable_bytes_per_s, flops / replica.achievable_flops_per_s) + reduces, reduces
    )


def _stage_weights(replica: DecoderReplica, layers: int, *, last: bool) -> int:
    """Weights one rank of a stage reads: its layers' linears and norms, the output head on the
    last stage (the input embedding's lookup reads only the batch's rows)."""
    variant = VARIANTS[replica.variant]
    return weight_bytes(
        replica.model, variant, layers, embeddings=int(last), tensor_parallel=replica.tensor_parallel
    )


def _decode_stage(replica: DecoderReplica, layers: int, *, last: bool, batch: int, context: int) -> StageTime:
    model, tp = replica.model, replica.tensor_parallel
    reads = _stage_weights(replica, layers, last=last) + kv_bytes_read(model, layers, batch, context, tp)
    matrices = layers * model.layer_linear_params() + int(last) * model.vocab * model.hidden
    attention = 4 * batch * context * layers * (model.heads // tp) * model.head_dim
    return _stage_time(
        replica, layers, reads=reads, flops=2 * batch * matrices / tp + attention, tokens=batch
    )


def handoff_seconds(replica: DecoderReplica, tokens: int) -> float:
    """One stage boundary: the hidden states and the residual of `tokens` tokens."""
    link = link_between(replica.spec, replica.tensor_parallel * replica.pipeline_parallel)
    payload = 2 * tokens * replica.model.hidden * ACTIVATION_BYTES
    return PIPELINE_HANDOFF_LATENCY_S + payload / link.one_way_bytes_per_s


@dataclass(frozen=True)
class DecodeStep:
    seconds: float  # one token for every sequence of the batch: the time per output token
    all_reduce_s: float  # of which TP all-reduces, in one microbatch's pass through the stages
    handoff_s: float  # of which PP hand-offs


def decode_step(replica: DecoderReplica, batch: int, context: int) -> DecodeStep:
    pp = replica.pipeline_parallel
    microbatches = min(pp, batch)
    per_microbatch = math.ceil(batch / microbatches)
    layers = pipeline_partition(replica.model.layers, pp)
    stages = [
        _decode_stage(replica, n, last=i == pp - 1, batch=per_microbatch, context=context)
        for i, n in enumerate(layers)
    ]
    handoffs = (pp - 1) * handoff_seconds(replica, per_microbatch)
    one_pass = sum(stage.seconds for stage in stages) + handoffs
    cycle = max(one_pass, microbatches * max(stage.seconds for stage in stages))
    return DecodeStep(
        seconds=DECODE_STEP_OVERHEAD_S + cycle,
        all_reduce_s=sum(stage.all_reduce_s for stage in stages),
        handoff_s=handoffs,
    )


def prefill_flops(
    model: TextModel, prompt_tokens: int, layers: int | None = None, *, head: bool = True
) -> int:
    """A prompt's forward over `layers` (all by default): linears, causal attention over the
    prompt (QK^T and AV, half the square each), and the output head at the one sampled position."""
    layers = model.layers if layers is None else layers
    linears = 2 * prompt_tokens * layers * model.layer_linear_params()
    attention = 2 * layers * prompt_tokens**2 * model.heads * model.head_dim
    return linears + attention + int(head) * 2 * model.vocab * model.hidden


@dataclass(frozen=True)
class Prefill:
    latency_s: float  # the prompt through every stage in turn
    busy_s: float  # what the busiest GPU spends on it: the share of its time decoding loses


def prefill(replica: DecoderReplica, prompt_tokens: int) -> Prefill:
    pp, tp = replica.pipeline_parallel, replica.tensor_parallel
    stages = [
        _stage_time(
            replica,
            n,
            reads=_stage_weights(replica, n, last=i == pp - 1),
            flops=prefill_flops(replica.model, prompt_tokens, n, head=i == pp - 1) / tp,
            tokens=prompt_tokens,
        )
        for i, n in enumerate(pipeline_partition(replica.model.layers, pp))
    ]
    handoffs = (pp - 1) * handoff_seconds(replica, prompt_tokens)
    return Prefill(
        latency_s=sum(stage.seconds for stage in stages) + handoffs,
        busy_s=max(stage.seconds for stage in stages),
    )


def usd_per_million_tokens(price_per_gpu_hour: float, gpus: int, tokens_per_s: float) -> float:
    return price_per_gpu_hour * gpus / (tokens_per_s * 3600) * 1e6


def max_batch(plan: Plan, shape: RequestShape, max_num_seqs: int) -> int:
    """Sequences one decoder replica runs at once: what its KV cache holds of requests of this
    shape (whole blocks each, as vLLM allocates them), at most the engine's max_num_seqs."""
    per_request = math.ceil(shape.tokens / BLOCK_SIZE) * BLOCK_SIZE
    return min(max_num_seqs, plan.kv_tokens_per_replica // per_request)


def replica_of(plan: Plan, gpu: str, variant: str, model: TextModel) -> DecoderReplica:
    layout = get_layout(plan.layout)
    return DecoderReplica(gpu, layout.tensor_parallel, layout.pipeline_parallel, variant, model)


@dataclass(frozen=True)
class LayoutThroughput:
    """A layout's decode speed for one request shape; zeros when it does not fit, as in Plan."""

    gpu: str
    prompt_tokens: int
    output_tokens: int
    max_batch_per_replica: int
    decode_tps_single_stream: float
    decode_tps_at_max_concurrency: float  # all decoder replicas of the layout, each at its max batch
    ttft_s: float  # the prompt alone on an idle replica
    price_per_gpu_hour: float | None
    usd_per_million_output_tokens: float | None  # at max concurrency, for all the layout's GPUs

    def as_dict(self) -> dict:
        fields = asdict(self)
        if self.price_per_gpu_hour is None:
            del fields["price_per_gpu_hour"], fields["usd_per_million_output_tokens"]
        return fields


def layout_throughput(
    plan: Plan,
    gpu: str,
    shape: RequestShape,
    *,
    max_num_seqs: int,
    variant: str = "instruct",
    model: TextModel = PUBLISHED_TEXT_MODEL,
    price_per_gpu_hour: float | None = None,
) -> LayoutThroughput:
    batch = max_batch(plan, shape, max_num_seqs) if plan.fits else 0
    single_s = full_tps = ttft_s = 0.0
    if batch:
        replica = replica_of(plan, gpu, variant, model)
        single_s = decode_step(replica, 1, shape.mean_context).seconds
        full_step_s = decode_step(replica, batch, shape.mean_context).seconds
        full_tps = get_layout(plan.layout).decoder_replicas * batch / full_step_s
        ttft_s = prefill(replica, shape.prompt_tokens).latency_s + single_s
    usd = None
    if price_per_gpu_hour is not None and batch:
        usd = round(usd_per_million_tokens(price_per_gpu_hour, plan.gpus, full_tps), 6)
    return LayoutThroughput(
        gpu=gpu,
        prompt_tokens=shape.prompt_tokens,
        output_tokens=shape.output_tokens,
        max_batch_per_replica=batch,
        decode_tps_single_stream=round(1 / single_s, 1) if batch else 0.0,
        decode_tps_at_max_concurrency=round(full_tps, 1),
        ttft_s=round(ttft_s, 4),
        price_per_gpu_hour=price_per_gpu_hour,
        usd_per_million_output_tokens=usd,
    )


@dataclass(frozen=True)
class VisionEncoder:
    """Pixtral and Mistral 3's projector: the dimensions an image's cost depends on.

    (Heads x head_dim = hidden: the split does not change the FLOPs.)"""

    layers: int
    hidden: int
    intermediate: int
    patch_px: int
    channels: int
    spatial_merge: int
    max_image_px: int


# The vision_config and spatial_merge_size of mistralai/Ministral-3-3B-*-2512's config.json
# (https://huggingface.co/mistralai/Ministral-3-3B-Instruct-2512/blob/main/config.json): Mistral
# Small 3.1's Pixtral tower, 24 layers x 1024, 16 heads of 64, gated MLP of 4096, patch 14,
# 1540 px, ~0.4B parameters (the model card; docs.nvidia.com/nemo/megatron-bridge, "Ministral 3").
PUBLISHED_VISION_ENCODER = VisionEncoder(
    layers=24, hidden=1024, intermediate=4096, patch_px=14, channels=3, spatial_merge=2, max_image_px=1540
)


def patch_grid(
    width_px: int, height_px: int, encoder: VisionEncoder = PUBLISHED_VISION_ENCODER
) -> tuple[int, int]:
    """(rows, columns) of patches the tower sees, as mistral-common sizes an image: scaled down to
    fit max_image_px, then covered by whole merged tokens of patch x merge pixels."""
    scale = max(width_px / encoder.max_image_px, height_px / encoder.max_image_px, 1.0)
    token_px = encoder.patch_px * encoder.spatial_merge

    def tokens(px: int) -> int:
        return (max(round(px / scale), 1) - 1) // token_px + 1

    return tokens(height_px) * encoder.spatial_merge, tokens(width_px) * encoder.spatial_merge


def encoder_flops(
    rows: int, columns: int, text_hidden: int, encoder: VisionEncoder = PUBLISHED_VISION_ENCODER
) -> int:
    """One image through the tower and the projector."""
    patches, d = rows * columns, encoder.hidden
    convolution = 2 * patches * encoder.channels * encoder.patch_px**2 * d
    per_layer = 2 * patches * (4 * d * d + 3 * d * encoder.intermediate) + 4 * patches**2 * d
    merged = patches // encoder.spatial_merge**2
    projector = 2 * merged * (encoder.spatial_merge**2 * d * d + d * text_hidden + text_hidden**2)
    return convolution + encoder.layers * per_layer + projector


def encoder_seconds_per_image(flops: int, gpu: str) -> float:
    return flops / (GPU_SPECS[gpu].dense_bf16_tflops * 1e12 * ACHIEVABLE_FLOPS_FRACTION)


def encoder_gpu_share(images_per_s: float, seconds_per_image: float) -> float:
    """The share of one GPU an encoder replica keeps busy at this image rate (above 1: more replicas)."""
    return images_per_s * seconds_per_image


@dataclass(frozen=True)
class LoadTarget:
    requests_per_s: float
    shape: RequestShape
    ttft_p95_s: float
    tpot_p95_s: float


def requests_per_s(
    batch: int, step_s: float, prefill_busy_s: float, ttft_s: float, output_tokens: int
) -> float:
    """The rate a replica holding `batch` requests completes them at (the module docstring's quadratic)."""
    a = prefill_busy_s * ttft_s
    b = ttft_s + (output_tokens - 1) * step_s + batch * prefill_busy_s
    # The smaller root, written so that it stays exact as prefill -> 0 (batch / time per request).
    return 2 * batch / (b + math.sqrt(b * b - 4 * a * batch))


@dataclass(frozen=True)
class OperatingPoint:
    batch: int
    requests_per_s: float
    ttft_s: float
    tpot_s: float


def operating_point(
    replica: DecoderReplica, batch: int, shape: RequestShape, prompt: Prefill
) -> OperatingPoint:
    step = decode_step(replica, batch, shape.mean_context).seconds
    ttft = prompt.latency_s + step
    rate = requests_per_s(batch, step, prompt.busy_s, ttft, shape.output_tokens)
    # A one-token answer has no time per output token (and leaves decoding no time to stretch).
    tpot = step / (1 - rate * prompt.busy_s) if shape.output_tokens > 1 else 0.0
    return OperatingPoint(batch, rate, ttft, tpot)


def meets(point: OperatingPoint, target: LoadTarget) -> bool:
    return (
        point.ttft_s * LATENCY_TAIL_FACTOR <= target.ttft_p95_s
        and point.tpot_s * LATENCY_TAIL_FACTOR <= target.tpot_p95_s
    )


def best_operating_point(
    replica: DecoderReplica, largest_batch: int, target: LoadTarget
) -> OperatingPoint | None:
    """The batch, up to `largest_batch`, at which the replica serves the most requests within the targets."""
    prompt = prefill(replica, target.shape.prompt_tokens)
    points = (operating_point(replica, b, target.shape, prompt) for b in range(1, largest_batch + 1))
    return max((p for p in points if meets(p, target)), key=lambda p: p.requests_per_s, default=None)


@dataclass(frozen=True)
class LoadOption:
    gpu: str
    layout: str
    copies: int  # of the layout, to carry the load
    gpus: int  # all copies'
    batch_per_replica: int
    requests_per_s_per_replica: float
    ttft_s: float
    tpot_s: float
    usd_per_hour: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def options_for_load(
    target: LoadTarget,
    plans: dict[str, list[Plan]],
    *,
    max_num_seqs: int,
    variant: str = "instruct",
    model: TextModel = PUBLISHED_TEXT_MODEL,
    prices: dict[str, float] | None = None,
) -> list[LoadOption]:
    """Every (GPU, layout) of `plans` (GPU -> its plans) that meets the targets, cheapest first:
    by dollars per hour where the GPU has a price, then by GPUs."""
    prices = prices or {}
    options = []
    for gpu, gpu_plans in plans.items():
        for plan in gpu_plans:
            largest = max_batch(plan, target.shape, max_num_seqs) if plan.fits else 0
            point = best_operating_point(replica_of(plan, gpu, variant, model), largest, target)
            if point is None:
                continue
            layout = get_layout(plan.layout)
            copies = math.ceil(target.requests_per_s / (layout.decoder_replicas * point.requests_per_s))
            gpus = copies * layout.gpus
            options.append(
                LoadOption(
                    gpu=gpu,
                    layout=plan.layout,
                    copies=copies,
                    gpus=gpus,
                    batch_per_replica=point.batch,
                    requests_per_s_per_replica=round(point.requests_per_s, 2),
                    ttft_s=round(point.ttft_s, 4),
                    tpot_s=round(point.tpot_s, 5),
                    usd_per_hour=round(gpus * prices[gpu], 2) if gpu in prices else None,
                )
            )
    return sorted(
        options, key=lambda o: (o.usd_per_hour is None, o.usd_per_hour or 0, o.gpus, o.gpu, o.layout)
    )


def gpu_summary(gpu: str) -> str:
    spec = GPU_SPECS[gpu]
    fp8 = f" / {spec.dense_fp8_tflops:,g} FP8" if spec.dense_fp8_tflops else " (no FP8)"
    links = f"PCIe {spec.pcie_gb_s:g} GB/s"
    if spec.nvlink_gb_s:
        links = f"NVLink {spec.nvlink_gb_s:g} GB/s within {spec.nvlink_gpus} GPUs, " + links
    return (
        f"{gpu}: {spec.memory_bandwidth_gb_s:,g} GB/s memory, dense {spec.dense_bf16_tflops:,g} TFLOPS BF16"
        f"{fp8}, {links} ({spec.source})"
    )


def format_throughput_table(plans: list[Plan], results: list[LayoutThroughput]) -> str:
    """Decode speed, TTFT and cost per layout: one row per plan."""
    first = results[0]
    header = (
        f"Modelled on {first.gpu} for {first.prompt_tokens:,} prompt + {first.output_tokens:,} output tokens "
        "(model estimates, single-stream decode calibrated: docs/capacity.md); "
        "batch/replica: what the KV cache holds of such requests, at most max_num_seqs\n"
    )
    columns = (
        "GPUs",
        "layout",
        "batch/replica",
        "tok/s 1 stream",
        "tok/s at max conc.",
        "TTFT ms",
        "$/M out",
    )
    rows = ["{:>4}  {:<18} {:>13} {:>15} {:>19} {:>8} {:>8}".format(*columns)]
    for plan, result in zip(plans, results, strict=True):
        if not result.max_batch_per_replica:
            rows.append(f"{plan.gpus:>4}  {plan.layout:<18} {'-':>13}  does not fit")
            continue
        usd = result.usd_per_million_output_tokens
        rows.append(
            f"{plan.gpus:>4}  {plan.layout:<18} {result.max_batch_per_replica:>13} "
            f"{result.decode_tps_single_stream:>15,.0f} {result.decode_tps_at_max_concurrency:>19,.0f} "
            f"{result.ttft_s * 1000:>8.1f} {'-' if usd is None else f'{usd:.3f}':>8}"
        )
    return header + "\n".join(rows)


def format_load_table(options: list[LoadOption], target: LoadTarget) -> str:
    shape = target.shape
    header = (
        f"{target.requests_per_s:g} requests/s of {shape.prompt_tokens:,} prompt + {shape.output_tokens:,} "
        f"output tokens, TTFT p95 <= {target.ttft_p95_s:g} s, TPOT p95 <= {target.tpot_p95_s:g} s "
        f"(modelled figures x {LATENCY_TAIL_FACTOR:g} for p95), cheapest first\n"
    )
    columns = ("GPU", "layout", "copies", "GPUs", "batch", "req/s/replica", "TTFT ms", "TPOT ms", "$/hour")
    rows = ["{:<10} {:<18} {:>6} {:>5} {:>6} {:>14} {:>8} {:>8} {:>9}".format(*columns)]
    for o in options:
        usd = "-" if o.usd_per_hour is None else f"{o.usd_per_hour:,.2f}"
        rows.append(
            f"{o.gpu:<10} {o.layout:<18} {o.copies:>6} {o.gpus:>5} {o.batch_per_replica:>6} "
            f"{o.requests_per_s_per_replica:>14,.2f} {o.ttft_s * 1000:>8.1f} {o.tpot_s * 1000:>8.2f} {usd:>9}"
        )
    return header + "\n".join(rows)


def no_option_message(target: LoadTarget, gpus: list[str]) -> str:
    return (
        f"no layout on {', '.join(gpus)} meets TTFT p95 <= {target.ttft_p95_s:g} s and TPOT p95 <= "
        f"{target.tpot_p95_s:g} s for {target.shape.prompt_tokens:,} + {target.shape.output_tokens:,}-token "
        "requests (or none fits the KV cache at --max-model-len): relax the targets, shorten the "
        "requests, lower --max-model-len, or try other GPUs"
    )
