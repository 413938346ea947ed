"""Application builder: validated config -> bound Ray Serve deployments.

`serve run serve/config.yaml` / `serve deploy serve/config.yaml` call
`build_app(args)` with the `args:` of the config file.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application, Deployment

from deployments.decoder import Decoder
from deployments.encoder import Encoder
from deployments.preprocess import Preprocess
from deployments.quota_ledger import QuotaLedger
from serve.config import AppConfig
from serve.ingress import Ingress
from serve.layouts import decoder_placement
from serve.tenants import tenants_file_path


def decoder_options(config: AppConfig) -> dict[str, Any]:
    """Serve options of the decoder: on GPUs, a placement group with one GPU bundle per rank."""
    decoder = config.deployments.decoder
    options = decoder.serve_options("decoder")
    if router := config.routing.request_router_config("decoder"):
        options["request_router_config"] = router
    if decoder.num_gpus > 0:
        # The ranks hold the GPUs (Ray workers in the bundles); the replica,
        # in the first bundle, holds only its CPUs.
        options["ray_actor_options"]["num_gpus"] = 0
        options |= decoder_placement(
            config.engine.tensor_parallel_size,
            config.engine.pipeline_parallel_size,
            gpu_per_rank=decoder.num_gpus,
            replica_cpus=decoder.num_cpus,
        )
    return options


def encoder_options(config: AppConfig) -> dict[str, Any]:
    options = config.deployments.encoder.serve_options("encoder")
    if router := config.routing.request_router_config("encoder"):
        options["request_router_config"] = router
    return options


def app_config(args: dict[str, Any] | AppConfig | None) -> AppConfig:
    """An application builder's one argument as a validated config: a Serve config file's `args`,
    or a config already built."""
    return args if isinstance(args, AppConfig) else AppConfig.model_validate(args or {})


def build_app(args: dict[str, Any] | AppConfig | None = None) -> Application:
    """Ingress -> (Preprocess -> Encoder ->) Decoder; the image stages only when images are on,
    the QuotaLedger only with a tenants file.

    Serve calls it with the config file's `args` (an application builder takes exactly one)."""
    return build_stages(app_config(args), Decoder)


def build_stages(config: AppConfig, decoder_deployment: Deployment, *decoder_args: Any) -> Application:
    """`build_app` with another decoder: a stand-in with its interface, bound to `config` and
    `decoder_args` (the autoscaling tests and the serving-ceiling benchmark use
    deployments/batching_stand_in.py's)."""
    stages = config.deployments
    decoder = decoder_deployment.options(**decoder_options(config)).bind(config, *decoder_args)
    other_stages: dict[str, Application] = {}
    if config.images.max_images_per_request > 0:
        other_stages = {
            "preprocess": Preprocess.options(**stages.preprocess.serve_options("preprocess")).bind(config),
            "encoder": Encoder.options(**encoder_options(config)).bind(config),
        }
    # Past the ingress's own queue, Serve's proxy answers: a 429 too, with Retry-After.
    backpressure = {"status_code": 429, "retry_after_s": config.limits.retry_after_s}
    ingress = Ingress.options(**stages.ingress.serve_options("ingress"), backpressure_config=backpressure)
    # Tenants' quotas hold for the application, whatever the number of ingress replicas.
    if tenants_file_path(config.auth.tenants_file) is not None:
        other_stages["ledger"] = QuotaLedger.bind()
    return ingress.bind(config, decoder, **other_stages)
