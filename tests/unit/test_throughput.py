"""The throughput model (serve/throughput.py) against counts made here from the architecture, and
`ministral-serve plan --tps / --for-load`."""

import json

import pytest

from serve import cli
from serve.capacity import GPU_MEMORY_GIB, GPU_SPECS, PUBLISHED_TEXT_MODEL, plan_all, plan_layout
from serve.layouts import LAYOUTS, get_layout
from serve.throughput import (
    ACHIEVABLE_BANDWIDTH_FRACTION,
    ACHIEVABLE_FLOPS_FRACTION,
    ACHIEVABLE_LINK_FRACTION,
    DECODE_STEP_OVERHEAD_S,
    LATENCY_TAIL_FACTOR,
    NVLINK_COLLECTIVE_LATENCY_S,
    PCIE_COLLECTIVE_LATENCY_S,
    PUBLISHED_VISION_ENCODER,
    DecoderReplica,
    LoadTarget,
    RequestShape,
    decode_step,
    encoder_flops,
    encoder_gpu_share,
    encoder_seconds_per_image,
    handoff_seconds,
    kv_bytes_read,
    layout_throughput,
    options_for_load,
    patch_grid,
    prefill,
    requests_per_s,
    usd_per_million_tokens,
)

# The published text model, written out: 26 layers x 3072, 32 heads and 8 KV heads of 128,
# gated MLP of 9216, a tied 131072-token embedding.
LAYERS, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 26, 3072, 9216, 32, 8, 128, 131072
LINEAR_PARAMS = LAYERS * (
    HIDDEN * HEADS * HEAD_DIM  # q
    + 2 * HIDDEN * KV_HEADS * HEAD_DIM  # k, v
    + HEADS * HEAD_DIM * HIDDEN  # o
    + 3 * HIDDEN * INTERMEDIATE  # gate, up, down
)
NORM_BYTES = LAYERS * 2 * HIDDEN * 2
KV_BYTES_PER_TOKEN = LAYERS * 2 * KV_HEADS * HEAD_DIM * 2  # keys and values, bf16
SHAPE = RequestShape(prompt_tokens=1000, output_tokens=200)


def weights_read(linear_weight_bytes: int) -> int:
    """One GPU's decode-step weight reads: every linear, the tied head (bf16) and the norms."""
    return LINEAR_PARAMS * linear_weight_bytes + VOCAB * HIDDEN * 2 + NORM_BYTES


def test_the_catalogue_gives_every_gpu_of_the_memory_table_its_throughput_figures():
    assert set(GPU_SPECS) == set(GPU_MEMORY_GIB)
    assert all(spec.source.startswith("https://") for spec in GPU_SPECS.values())


@pytest.mark.parametrize("gpu", ["T4", "A10G", "A100-40GB", "A100-80GB", "A6000"])
def test_cards_without_fp8_tensor_cores_have_none(gpu):
    assert GPU_SPECS[gpu].dense_fp8_tflops is None


@pytest.mark.parametrize("gpu", [gpu for gpu, spec in GPU_SPECS.items() if spec.dense_fp8_tflops is not None])
def test_fp8_and_bf16_peaks_are_both_dense(gpu):
    # FP8 runs at twice BF16 on Ada and Hopper: a sparse figure beside a dense one breaks it.
    spec = GPU_SPECS[gpu]
    assert spec.dense_fp8_tflops == pytest.approx(2 * spec.dense_bf16_tflops, rel=0.02)


@pytest.mark.parametrize(
    ("gpu", "bandwidth", "bf16", "fp8"),
    [("H100", 3350, 989.4, 1978.9), ("H200", 4800, 989.4, 1978.9), ("L4", 300, 121, 242.5)],
)
def test_datasheet_figures_are_dense_ones(gpu, bandwidth, bf16, fp8):
    spec = GPU_SPECS[gpu]
    assert (spec.memory_bandwidth_gb_s, spec.dense_bf16_tflops, spec.dense_fp8_tflops) == (
        bandwidth,
        bf16,
        fp8,
    )


@pytest.mark.parametrize(("variant", "linear_weight_bytes"), [("instruct", 1), ("reasoning", 2)])
@pytest.mark.parametrize("gpu", ["H100", "L4", "A100-80GB", "T4"])
def test_decode_at_batch_one_is_its_bytes_over_bandwidth_plus_the_step_overhead(
    gpu, variant, linear_weight_bytes
):
    context = SHAPE.mean_context
    step = decode_step(DecoderReplica(gpu, variant=variant), 1, context)
    bytes_read = weights_read(linear_weight_bytes) + context * KV_BYTES_PER_TOKEN
    bandwidth = GPU_SPECS[gpu].memory_bandwidth_gb_s * 1e9 * ACHIEVABLE_BANDWIDTH_FRACTION
    assert step.seconds - DECODE_STEP_OVERHEAD_S == pytest.approx(bytes_read / bandwidth, rel=1e-9)
    assert step.all_reduce_s == step.handoff_s == 0


@pytest.mark.parametrize(
    ("gpu", "latency", "link_gb_s"),
    [("H100", NVLINK_COLLECTIVE_LATENCY_S, 900), ("L40S", PCIE_COLLECTIVE_LATENCY_S, 64)],
)
def test_tensor_parallel_2_halves_each_gpus_reads_and_adds_two_all_reduces_per_layer(gpu, latency, link_gb_s):
    one, two = (decode_step(DecoderReplica(gpu, tensor_parallel=tp), 1, 1100) for tp in (1, 2))
    one_way = link_gb_s / 2 * 1e9 * ACHIEVABLE_LINK_FRACTION
    # Ring all-reduce of one token's bf16 hidden state over 2 ranks: 2(n-1)/n = 1 payload each way.
    assert two.all_reduce_s == pytest.approx(LAYERS * 2 * (latency + HIDDEN * 2 / one_way))
    reads_one = one.seconds - DECODE_STEP_OVERHEAD_S
    reads_two = two.seconds - DECODE_STEP_OVERHEAD_S - two.all_reduce_s
    assert reads_two == pytest.approx(reads_one / 2, rel=1e-3)  # the norms are replicated
    assert one.seconds / 2 < two.seconds < one.seconds  # faster, and less than twice


@pytest.mark.parametrize("pipeline_parallel", [2, 3, 4])
def test_a_pipeline_gives_one_stream_no_speed_up_and_costs_its_hand_offs(pipeline_parallel):
    one = decode_step(DecoderReplica("H100"), 1, 1100)
    staged = DecoderReplica("H100", pipeline_parallel=pipeline_parallel)
    step = decode_step(staged, 1, 1100)
    # The stages read between them what one GPU reads, one after the other.
    assert step.handoff_s == pytest.approx((pipeline_parallel - 1) * handoff_seconds(staged, 1))
    assert step.seconds == pytest.approx(one.seconds + step.handoff_s)
    assert step.seconds > one.seconds


def test_a_full_pipeline_runs_at_its_slowest_stage():
    one, two = DecoderReplica("H100"), DecoderReplica("H100", pipeline_parallel=2)
    # 64 sequences in 2 microbatches: each GPU reads its half of the weights and KV cache twice a cycle.
    assert 64 / decode_step(two, 64, 1100).seconds > 64 / decode_step(one, 64, 1100).seconds


@pytest.mark.parametrize(("sequences", "context"), [(1, 1000), (2, 1000), (1, 2000), (64, 8000)])
def test_kv_bytes_read_are_every_sequences_context_on_the_stages_layers(sequences, context):
    assert (
        kv_bytes_read(PUBLISHED_TEXT_MODEL, LAYERS, sequences, context, 1)
        == sequences * context * KV_BYTES_PER_TOKEN
    )
    assert (
        kv_bytes_read(PUBLISHED_TEXT_MODEL, LAYERS, sequences, context, 2)
        == sequences * context * KV_BYTES_PER_TOKEN // 2
    )


def test_a_decode_step_grows_with_batch_and_context():
    replica = DecoderReplica("L40S")
    steps = [
        decode_step(replica, batch, context).seconds for batch, context in [(1, 1000), (8, 1000), (8, 4000)]
    ]
    assert steps == sorted(steps) and len(set(steps)) == 3


@pytest.mark.parametrize(
    ("gpu", "variant", "peak"),
    [("H100", "instruct", 1978.9), ("H100", "reasoning", 989.4), ("A100-80GB", "instruct", 312)],
)
def test_a_long_prefill_is_its_flops_at_the_achievable_share_of_the_weights_peak(gpu, variant, peak):
    prompt = 8000
    flops = (
        2 * LINEAR_PARAMS * prompt
        + 2 * LAYERS * prompt**2 * HEADS * HEAD_DIM  # causal QK^T and AV: half the square each
        + 2 * VOCAB * HIDDEN  # the output head at the sampled position
    )
    result = prefill(DecoderReplica(gpu, variant=variant), prompt)
    assert (
        result.latency_s == result.busy_s == pytest.approx(flops / (peak * 1e12 * ACHIEVABLE_FLOPS_FRACTION))
    )


def test_tensor_parallel_shortens_a_prefill_and_a_pipeline_does_not():
    one, two, staged = (
        prefill(DecoderReplica("H100", tensor_parallel=tp, pipeline_parallel=pp), 4000).latency_s
        for tp, pp in [(1, 1), (2, 1), (1, 2)]
    )
    assert two < one < staged


@pytest.mark.parametrize(
    ("width", "height", "grid"),
    [
        (1540, 1540, (110, 110)),
        (640, 480, (36, 46)),  # ceil(480 / 28) = 18 and ceil(640 / 28) = 23 merged tokens
        (3080, 1540, (56, 110)),  # halved to 1540 x 770 first
        (28, 28, (2, 2)),
        (29, 28, (2, 4)),
    ],
)
def test_an_image_is_covered_by_whole_merged_tokens_of_28_pixels(width, height, grid):
    assert patch_grid(width, height) == grid


@pytest.mark.parametrize(("rows", "columns"), [(110, 110), (36, 46), (2, 2)])
def test_encoder_flops_are_the_towers_and_the_projectors_matrix_products(rows, columns):
    # Pixtral of Ministral 3: 24 layers x 1024, gated MLP of 4096, patch 14 over 3 channels; the
    # projector merges 2 x 2 patches (4096 -> 1024), then 1024 -> 3072 -> 3072.
    n, d = rows * columns, 1024
    per_layer = (
        4 * 2 * n * d * d  # q, k, v, o
        + 2 * n * d * 4096 * 2  # gate and up
        + 2 * n * 4096 * d  # down
        + 2 * n * n * d  # scores over the image's patches
        + 2 * n * n * d  # their mix of the values
    )
    merged = n // 4
    projector = 2 * merged * 4096 * d + 2 * merged * d * 3072 + 2 * merged * 3072 * 3072
    expected = 2 * n * 3 * 14 * 14 * d + 24 * per_layer + projector
    assert encoder_flops(rows, columns, text_hidden=3072) == expected


def test_the_published_encoder_dimensions_make_the_cards_0_4b_parameters():
    encoder = PUBLISHED_VISION_ENCODER
    d = encoder.hidden
    per_layer = 4 * d * d + 3 * d * encoder.intermediate + 2 * d  # attention, gated MLP, two norms
    tower = encoder.channels * encoder.patch_px**2 * d + encoder.layers * per_layer
    assert 0.38e9 < tower < 0.42e9


def test_an_encoder_replicas_share_of_a_gpu_is_its_image_rate_times_its_seconds_per_image():
    flops = encoder_flops(*patch_grid(1540, 1540), text_hidden=HIDDEN)
    seconds = encoder_seconds_per_image(flops, "L4")
    assert seconds == pytest.approx(flops / (121e12 * ACHIEVABLE_FLOPS_FRACTION))
    assert encoder_gpu_share(5, seconds) == pytest.approx(5 * seconds)
    assert encoder_gpu_share(10, seconds) == pytest.approx(2 * encoder_gpu_share(5, seconds))


@pytest.mark.parametrize("gpu", ["H100", "L40S", "L4", "A100-80GB"])
def test_tokens_per_s_at_full_concurrency_are_at_least_one_streams(gpu):
    for plan in plan_all(gpu_memory_gib=GPU_MEMORY_GIB[gpu], max_model_len=32768):
        result = layout_throughput(plan, gpu, SHAPE, max_num_seqs=64)
        assert result.max_batch_per_replica >= 1
        assert result.decode_tps_at_max_concurrency >= result.decode_tps_single_stream > 0


def test_a_layout_that_does_not_fit_has_no_throughput():
    plan = plan_layout(get_layout("1gpu"), gpu_memory_gib=GPU_MEMORY_GIB["T4"], max_model_len=262144)
    result = layout_throughput(plan, "T4", SHAPE, max_num_seqs=64, price_per_gpu_hour=0.5)
    assert not plan.fits
    assert (result.max_batch_per_replica, result.decode_tps_at_max_concurrency) == (0, 0.0)
    assert result.usd_per_million_output_tokens is None


def test_the_batch_is_what_the_kv_cache_holds_of_such_requests_up_to_max_num_seqs():
    plan = plan_layout(get_layout("1gpu"), gpu_memory_gib=GPU_MEMORY_GIB["T4"], max_model_len=32768)
    held = plan.kv_tokens_per_replica // 1200  # 1,200 tokens: 75 whole blocks of 16
    assert layout_throughput(plan, "T4", SHAPE, max_num_seqs=1024).max_batch_per_replica == held
    assert layout_throughput(plan, "T4", SHAPE, max_num_seqs=8).max_batch_per_replica == 8


@pytest.mark.parametrize(
    ("price", "gpus", "tokens_per_s", "usd"),
    [(2.5, 1, 1000, 2.5 / 3.6), (2.0, 4, 10_000, 8 / 36), (1.0, 1, 1e6 / 3600, 1.0)],
)
def test_dollars_per_million_tokens(price, gpus, tokens_per_s, usd):
    assert usd_per_million_tokens(price, gpus, tokens_per_s) == pytest.approx(usd)


@pytest.mark.parametrize("name", ["1gpu", "2gpu-dp", "2gpu-encoder", "4gpu-tp"])
def test_a_layouts_cost_per_token_is_its_gpus_price_over_its_full_concurrency_tokens(name):
    plan = plan_layout(get_layout(name), gpu_memory_gib=GPU_MEMORY_GIB["H100"], max_model_len=32768)
    result = layout_throughput(plan, "H100", SHAPE, max_num_seqs=64, price_per_gpu_hour=2.5)
    expected = 2.5 * LAYOUTS[name].gpus / (result.decode_tps_at_max_concurrency * 3600) * 1e6
    assert result.usd_per_million_output_tokens == pytest.approx(expected, rel=1e-4)


def test_without_prefill_a_replicas_rate_is_its_batch_over_the_time_per_request():
    assert requests_per_s(32, 0.01, 0.0, 0.2, 101) == pytest.approx(32 / (0.2 + 100 * 0.01))


@pytest.mark.parametrize(("batch", "prefill_s"), [(1, 0.01), (32, 0.005), (64, 0.02)])
def test_a_replicas_rate_meets_littles_law_with_decoding_slowed_by_prefill(batch, prefill_s):
    step, ttft, output = 0.01, 0.05, 200
    rate = requests_per_s(batch, step, prefill_s, ttft, output)
    tpot = step / (1 - rate * prefill_s)
    assert 0 < rate * prefill_s < 1
    assert batch == pytest.approx(rate * (ttft + (output - 1) * tpot))


def plans_on(*gpus: str, max_model_len: int = 32768) -> dict:
    return {gpu: plan_all(gpu_memory_gib=GPU_MEMORY_GIB[gpu], max_model_len=max_model_len) for gpu in gpus}


EASY = LoadTarget(requests_per_s=20, shape=SHAPE, ttft_p95_s=2.0, tpot_p95_s=0.1)


@pytest.mark.parametrize(
    ("prices", "cheapest"), [({"H100": 10.0, "L4": 0.5}, "L4"), ({"H100": 1.0, "L4": 5.0}, "H100")]
)
def test_the_cheapest_configuration_that_meets_the_targets_comes_first(prices, cheapest):
    options = options_for_load(EASY, plans_on("H100", "L4"), max_num_seqs=64, prices=prices)
    assert options[0].gpu == cheapest
    costs = [option.usd_per_hour for option in options]
    assert costs == sorted(costs)
    assert all(o.usd_per_hour == pytest.approx(o.gpus * prices[o.gpu]) for o in options)


def test_unpriced_gpus_rank_by_gpus_after_the_priced_ones():
    options = options_for_load(EASY, plans_on("H100", "L4"), max_num_seqs=64, prices={"L4": 0.5})
    unpriced = [o for o in options if o.usd_per_hour is None]
    assert options[-len(unpriced) :] == unpriced and {o.gpu for o in unpriced} == {"H100"}
    assert [o.gpus for o in unpriced] == sorted(o.gpus for o in unpriced)


def test_each_option_carries_the_load_within_the_targets():
    options = options_for_load(EASY, plans_on("L4", "H100"), max_num_seqs=64)
    assert {o.gpu for o in options} == {"L4", "H100"}
    for option in options:
        layout = LAYOUTS[option.layout]
        per_copy = layout.decoder_replicas * option.requests_per_s_per_replica  # shown to 2 decimals
        assert option.gpus == option.copies * layout.gpus
        # Little's law per replica, and the fewest copies that carry the load.
        assert option.copies * per_copy >= EASY.requests_per_s * (1 - 1e-3)
        assert (option.copies - 1) * per_copy < EASY.requests_per_s * (1 + 1e-3)
        assert option.ttft_s * LATENCY_TAIL_FACTOR <= EASY.ttft_p95_s
        assert option.tpot_s * LATENCY_TAIL_FACTOR <= EASY.tpot_p95_s


def test_a_tighter_time_per_token_needs_more_gpus():
    tight = LoadTarget(requests_per_s=20, shape=SHAPE, ttft_p95_s=2.0, tpot_p95_s=0.01)
    easy, hard = (options_for_load(t, plans_on("H100"), max_num_seqs=64) for t in (EASY, tight))
    assert hard and hard[0].gpus >= easy[0].gpus
    assert hard[0].batch_per_replica <= easy[0].batch_per_replica


def test_no_option_when_no_layout_meets_the_targets():
    impossible = LoadTarget(requests_per_s=20, shape=SHAPE, ttft_p95_s=1e-4, tpot_p95_s=1e-4)
    assert options_for_load(impossible, plans_on(*GPU_SPECS), max_num_seqs=64) == []


def run_plan(capsys, *args: str) -> str:
    cli.main(["plan", *args])
    return capsys.readouterr().out


@pytest.mark.parametrize("price", [[], ["--price-per-hour", "2.5"]])
def test_plan_tps_json_carries_the_throughput_of_every_preset_beside_its_plan(capsys, price):
    payload = json.loads(
        run_plan(capsys, "--gpu", "H100", "--max-model-len", "32768", "--tps", "--json", *price)
    )
    assert [entry["layout"] for entry in payload] == list(LAYOUTS)
    plan_keys = set(plan_layout(get_layout("1gpu"), gpu_memory_gib=80).as_dict())
    for entry in payload:
        assert plan_keys <= set(entry)
        assert entry["decode_tps_at_max_concurrency"] >= entry["decode_tps_single_stream"] > 0
        assert ("usd_per_million_output_tokens" in entry) == bool(price)


def test_plan_tps_of_one_layout_is_one_object(capsys):
    entry = json.loads(
        run_plan(
            capsys, "--layout", "2gpu-tp", "--gpu", "L40S", "--max-model-len", "32768", "--tps", "--json"
        )
    )
    assert entry["layout"] == "2gpu-tp" and entry["gpu"] == "L40S" and entry["decode_tps_single_stream"] > 0


def test_plan_tables_name_the_gpus_figures_and_the_modelled_speeds(capsys):
    out = run_plan(
        capsys,
        "--gpu",
        "H100",
        "--tps",
        "--prompt-tokens",
        "500",
        "--output-tokens",
        "100",
        "--price-per-hour",
        "2.5",
    )
    assert "H100: 3,350 GB/s memory, dense 989.4 TFLOPS BF16 / 1,978.9 FP8, NVLink 900 GB/s" in out
    assert "Modelled on H100 for 500 prompt + 100 output tokens" in out
    assert all(name in out for name in LAYOUTS)
    assert "GB/s" not in run_plan(capsys, "--gpu-memory-gib", "80")


def test_plan_for_load_ranks_priced_gpus_by_cost(capsys):
    out = run_plan(
        capsys,
        *("--for-load", "20", "--ttft-p95", "2", "--tpot-p95", "0.1", "--max-model-len", "32768", "--json"),
        *("--price-per-hour-of", "H100=10", "--price-per-hour-of", "L4=0.5"),
    )
    options = json.loads(out)
    assert options[0]["gpu"] == "L4"
    assert {"layout", "copies", "gpus", "batch_per_replica", "usd_per_hour"} <= set(options[0])


def test_plan_for_load_says_when_nothing_meets_the_targets(capsys):
    with pytest.raises(SystemExit) as exit_:
        run_plan(capsys, "--for-load", "20", "--ttft-p95", "0.0001", "--tpot-p95", "0.0001", "--gpu", "L4")
    assert "no layout on L4 meets TTFT p95 <= 0.0001 s" in str(exit_.value.code)


FOR_LOAD = ("--for-load", "5", "--ttft-p95", "1", "--tpot-p95", "0.05")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("--tps", "--gpu-memory-gib", "80"), "--tps needs a catalogue GPU (--gpu NAME)"),
        ((*FOR_LOAD, "--gpu-memory-gib", "80"), "--for-load needs a catalogue GPU (--gpu NAME)"),
        (("--tps", *FOR_LOAD), "give one of them"),
        (("--for-load", "5"), "--for-load needs its targets: --ttft-p95 SECONDS and --tpot-p95 SECONDS"),
        (("--for-load", "5", "--ttft-p95", "1"), "--for-load needs its targets"),
        (("--price-per-hour", "2"), "--price-per-hour prices the modelled tokens/s: add --tps"),
        (("--tpot-p95", "0.05"), "are for --for-load RPS"),
        (("--price-per-hour-of", "H100=2"), "are for --for-load RPS"),
        (("--prompt-tokens", "100"), "shape the requests of --tps or --for-load"),
        ((*FOR_LOAD, "--price-per-hour", "2"), "--price-per-hour prices the one --gpu"),
        (("--tps", "--prompt-tokens", "300000"), "does not fit --max-model-len 262,144"),
    ],
)
def test_plan_refuses_flag_combinations_that_mean_nothing_and_says_why(capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_:
        run_plan(capsys, *arguments)
    assert message in str(exit_.value.code)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("--price-per-hour-of", "B200=3"), "expected GPU=PRICE with a GPU among T4, A10G"),
        (("--price-per-hour-of", "H100=cheap"), "expected a number, not 'cheap'"),
        (("--tps", "--price-per-hour", "0"), "must be above 0"),
        (("--for-load", "-1"), "must be above 0"),
    ],
)
def test_plan_refuses_bad_values_naming_the_flag(capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_:
        run_plan(capsys, *arguments)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
