"""Ray Serve LLM (`ray.serve.llm`), a peer stack, on the language-model view of our checkpoint.

`python -m benchmarks.ray_serve_llm --config CONFIG --host HOST --port PORT` starts a
Ray instance of its own and Ray Serve LLM's OpenAI app on it, with the
engine settings of our config (as vLLM's server gets them), and keeps
serving until interrupted. Text only: its multimodal path on this
checkpoint needs the same CPU fixes as vLLM's (see `vllm_cpu_shim`).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import yaml

from benchmarks.stacks import engine_cpu_environment
from deployments.engine_settings import engine_parallelism, usable_cores
from deployments.language_model import write_language_model_view
from serve.checkpoint import open_checkpoint
from serve.config import AppConfig


def llm_config(config: AppConfig, model_dir: Path, *, on_gpu: bool):
    """Ray Serve LLM's `LLMConfig` with the engine settings our decoder and vLLM's server get."""
    from ray.serve.llm import LLMConfig

    engine = config.engine
    parallelism = engine_parallelism(engine, on_gpu=on_gpu, cpu_cores=len(usable_cores()))
    engine_kwargs = {
        "tokenizer_mode": "mistral",
        "dtype": engine.dtype,
        "max_model_len": engine.max_model_len,
        "max_num_seqs": engine.max_num_seqs,
        "max_num_batched_tokens": engine.max_num_batched_tokens,
        "gpu_memory_utilization": engine.gpu_memory_utilization,
        "enable_prefix_caching": engine.enable_prefix_caching,
        "enforce_eager": engine.enforce_eager,
        "tensor_parallel_size": parallelism.tensor_parallel,
        "pipeline_parallel_size": parallelism.pipeline_parallel,
    }
    options: dict = {}
    if not on_gpu:
        # Its default placement asks for GPUs; on CPU the engine runs in the replica's one-CPU bundle.
        engine_kwargs["distributed_executor_backend"] = parallelism.executor
        options["placement_group_config"] = {"bundles": [{"CPU": 1}]}
    return LLMConfig(
        model_loading_config={"model_id": config.model.name, "model_source": str(model_dir)},
        deployment_config={
            "num_replicas": 1,
            "max_ongoing_requests": config.deployments.decoder.max_ongoing_requests,
        },
        engine_kwargs=engine_kwargs,
        **options,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="our Serve config (its first app's args)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()

    import ray
    import torch
    from ray import serve
    from ray.serve.llm import build_openai_app

    application = yaml.safe_load(args.config.read_text())["applications"][0]
    config = AppConfig.model_validate(application.get("args") or {})
    on_gpu = torch.cuda.is_available()
    model_dir = write_language_model_view(open_checkpoint(config.model, weights=True))
    engine_environment = {} if on_gpu else engine_cpu_environment(config.engine)
    # As for our service (serve/cli.py): Ray's default nice 15 for workers would starve the engine.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(include_dashboard=False, runtime_env={"env_vars": engine_environment})
    serve.start(http_options={"host": args.host, "port": args.port})
    app = build_openai_app(
        {
            "llm_configs": [llm_config(config, model_dir, on_gpu=on_gpu)],
            # Like our ingress: no CPU reserved, so that the app fits where ours does.
            "ingress_deployment_config": {"ray_actor_options": {"num_cpus": 0}},
        }
    )
    serve.run(app, name="ray-serve-llm", route_prefix="/")
    print(f"Ray Serve LLM is up at http://{args.host}:{args.port}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    main()
