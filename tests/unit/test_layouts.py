"""Layout presets: shapes, placement, the Serve configs generated from them, and the engine's shape."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from deployments.engine_settings import cpu_environment, engine_args, engine_parallelism
from serve.app import decoder_options
from serve.config import AppConfig, EngineConfig
from serve.layouts import (
    LAYOUTS,
    LayoutError,
    check_shape,
    cluster_needs,
    decoder_placement,
    get_layout,
    serve_config,
)

CONFIGS = Path(__file__).parents[2] / "serve" / "configs"

# name: (TP, PP, decoder replicas, total GPUs, encoder on its own GPU)
EXPECTED = {
    "1gpu": (1, 1, 1, 1, False),
    "2gpu-tp": (2, 1, 1, 2, False),
    "2gpu-pp": (1, 2, 1, 2, False),
    "2gpu-dp": (1, 1, 2, 2, False),
    "2gpu-encoder": (1, 1, 1, 2, True),
    "3gpu-pp": (1, 3, 1, 3, False),
    "4gpu-tp": (4, 1, 1, 4, False),
    "4gpu-pp": (1, 4, 1, 4, False),
    "4gpu-tp2pp2": (2, 2, 1, 4, False),
    "4gpu-dp": (1, 1, 4, 4, False),
    "4gpu-encoder-pp3": (1, 3, 1, 4, True),
}


def test_the_registry_has_the_presets_asked_for():
    assert set(LAYOUTS) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_expands_into_a_valid_config(name):
    tp, pp, replicas, gpus, own_encoder_gpu = EXPECTED[name]
    layout = get_layout(name)
    assert (layout.tensor_parallel, layout.pipeline_parallel, layout.decoder_replicas) == (tp, pp, replicas)
    assert layout.gpus == gpus
    config = AppConfig.model_validate({"layout": name})
    assert (config.engine.tensor_parallel_size, config.engine.pipeline_parallel_size) == (tp, pp)
    assert config.deployments.decoder.num_replicas == replicas
    encoder, decoder = config.deployments.encoder, config.deployments.decoder
    if own_encoder_gpu:
        assert encoder.num_gpus == 1 and decoder.num_gpus == 1
    else:
        # The encoder and a decoder rank fit one card, and vLLM leaves the encoder its share.
        assert encoder.num_gpus + decoder.num_gpus <= 1
        assert config.engine.gpu_memory_utilization + encoder.num_gpus <= 1
    reserved = replicas * tp * pp * decoder.num_gpus + encoder.num_gpus * encoder.num_replicas
    assert gpus - 1 < reserved <= gpus


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        (
            {"tensor_parallel": 3, "pipeline_parallel": 1},
            "must divide the 32 attention heads and the 8 KV heads",
        ),
        ({"tensor_parallel": 16, "pipeline_parallel": 1}, "8 KV heads"),
        ({"tensor_parallel": 1, "pipeline_parallel": 27}, "exceeds the model's 26 layers"),
        ({"tensor_parallel": 4, "pipeline_parallel": 1, "gpus_per_node": 2}, "must sit on one node"),
    ],
)
def test_invalid_shapes_are_refused_with_the_reason(shape, message):
    with pytest.raises(LayoutError, match=message):
        check_shape(**shape)


def test_config_errors_name_the_problem():
    with pytest.raises(ValidationError, match="unknown layout '5gpu'; the layouts are 1gpu, 2gpu-tp"):
        AppConfig.model_validate({"layout": "5gpu"})
    with pytest.raises(ValidationError, match="tensor_parallel_size is 1 but layout '2gpu-tp' sets it to 2"):
        AppConfig.model_validate({"layout": "2gpu-tp", "engine": {"tensor_parallel_size": 1}})
    with pytest.raises(ValidationError, match="must sit on one node"):
        AppConfig.model_validate({"layout": "4gpu-tp", "gpus_per_node": 2})
    assert (
        AppConfig.model_validate({"layout": "4gpu-tp2pp2", "gpus_per_node": 2}).engine.tensor_parallel_size
        == 2
    )


def test_memory_fraction_may_be_lowered_but_not_raised():
    lowered = AppConfig.model_validate({"layout": "1gpu", "engine": {"gpu_memory_utilization": 0.5}})
    assert lowered.engine.gpu_memory_utilization == 0.5
    raised = AppConfig.model_validate({"layout": "1gpu", "engine": {"gpu_memory_utilization": 0.99}})
    assert raised.engine.gpu_memory_utilization == get_layout("1gpu").gpu_memory_utilization


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_decoder_replica_gets_one_gpu_bundle_per_rank(name):
    tp, pp, *_ = EXPECTED[name]
    config = AppConfig.model_validate({"layout": name, "deployments": {"decoder": {"num_cpus": 2}}})
    options = decoder_options(config)
    bundles = options["placement_group_bundles"]
    assert len(bundles) == tp * pp
    assert all(bundle["GPU"] == config.deployments.decoder.num_gpus for bundle in bundles)
    # The replica itself sits in the first bundle with its CPUs, holding no GPU of its own.
    assert bundles[0]["CPU"] == 2 and all("CPU" not in bundle for bundle in bundles[1:])
    assert options["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0}
    assert options["placement_group_strategy"] == ("STRICT_PACK" if pp == 1 else "PACK")


def test_a_cpu_decoder_has_no_placement_group():
    assert "placement_group_bundles" not in decoder_options(AppConfig())


def test_placement_without_replica_cpus_keeps_bundles_gpu_only():
    assert decoder_placement(2, 1, gpu_per_rank=1.0, replica_cpus=0) == {
        "placement_group_bundles": [{"GPU": 1.0}, {"GPU": 1.0}],
        "placement_group_strategy": "STRICT_PACK",
    }


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_checked_in_serve_configs_match_the_registry(name):
    path = CONFIGS / f"{name}.yaml"
    assert path.read_text() == serve_config(get_layout(name))
    (application,) = yaml.safe_load(path.read_text())["applications"]
    assert application["import_path"] == "serve.app:build_app"
    assert AppConfig.model_validate(application["args"]).layout == name


def test_checked_in_cluster_needs_match_the_registry():
    text = (CONFIGS / "cluster-needs.json").read_text()
    assert text == cluster_needs(LAYOUTS)
    needs = json.loads(text)
    assert set(needs) == set(EXPECTED)
    # What the Helm chart sizes GPU workers by: all GPUs, and TP groups kept whole.
    assert {name: (n["gpus"], n["gpus_per_worker_multiple"]) for name, n in needs.items()} == {
        "1gpu": (1, 1),
        "2gpu-tp": (2, 2),
        "2gpu-pp": (2, 1),
        "2gpu-dp": (2, 1),
        "2gpu-encoder": (2, 1),
        "3gpu-pp": (3, 1),
        "4gpu-tp": (4, 4),
        "4gpu-pp": (4, 1),
        "4gpu-tp2pp2": (4, 2),
        "4gpu-dp": (4, 1),
        "4gpu-encoder-pp3": (4, 1),
    }


def test_configs_command_detects_drift(tmp_path):
    run = [sys.executable, "-m", "serve", "configs", "--directory", str(tmp_path)]
    assert subprocess.run(run, capture_output=True, text=True, timeout=120).returncode == 0
    assert subprocess.run([*run, "--check"], capture_output=True, timeout=120).returncode == 0
    (tmp_path / "2gpu-tp.yaml").write_text("edited by hand\n")
    drift = subprocess.run([*run, "--check"], capture_output=True, text=True, timeout=120)
    assert drift.returncode != 0 and "2gpu-tp.yaml" in drift.stderr


@pytest.mark.parametrize(
    ("tp", "pp", "on_gpu", "cores", "expected"),
    [
        (4, 1, True, 2, (4, 1, "ray")),
        (2, 2, True, 2, (2, 2, "ray")),
        (1, 1, True, 2, (1, 1, "ray")),
        (4, 1, False, 2, (2, 1, "mp")),
        (2, 1, False, 2, (2, 1, "mp")),
        (1, 1, False, 2, (1, 1, "uni")),
        (1, 2, False, 2, (1, 2, "mp")),
        (1, 3, False, 2, (1, 2, "mp")),
        (2, 2, False, 2, (2, 1, "mp")),
        (2, 2, False, 16, (2, 2, "mp")),
    ],
)
def test_engine_shape_on_gpus_and_scaled_down_on_cpu(tp, pp, on_gpu, cores, expected):
    engine = EngineConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp)
    shape = engine_parallelism(engine, on_gpu=on_gpu, cpu_cores=cores)
    assert (shape.tensor_parallel, shape.pipeline_parallel, shape.executor) == expected


def test_cpu_ranks_get_their_own_cores():
    engine = EngineConfig(tensor_parallel_size=2)
    shape = engine_parallelism(engine, on_gpu=False, cpu_cores=4)
    assert cpu_environment(engine, shape, [0, 1, 2, 3])["VLLM_CPU_OMP_THREADS_BIND"] == "0,1|2,3"
    single = engine_parallelism(EngineConfig(), on_gpu=False, cpu_cores=4)
    assert cpu_environment(EngineConfig(), single, [0, 1, 2, 3])["VLLM_CPU_OMP_THREADS_BIND"] == "auto"


def test_cpu_pipeline_engines_run_vllms_warm_up():
    # vLLM-CPU creates a pipeline stage's receive buffer only in its warm-up,
    # which eager engines skip.
    engine = EngineConfig(pipeline_parallel_size=2, enforce_eager=True)
    shape = engine_parallelism(engine, on_gpu=False, cpu_cores=2)
    args = engine_args(engine, shape, model_dir="m", tokenizer_dir="t", served_name="n")
    assert args.enforce_eager is False
    assert (args.compilation_config.mode, args.compilation_config.backend) == (2, "eager")
    gpu = engine_args(
        engine,
        engine_parallelism(engine, on_gpu=True, cpu_cores=2),
        model_dir="m",
        tokenizer_dir="t",
        served_name="n",
    )
    assert gpu.enforce_eager is True and gpu.distributed_executor_backend == "ray"
