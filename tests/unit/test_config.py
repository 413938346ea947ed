"""The config tree: the shipped Serve config validates, mistakes fail loudly at start-up."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from serve.config import AppConfig

SERVE_CONFIG = Path(__file__).parents[2] / "serve" / "config.yaml"


def test_shipped_serve_config_is_valid():
    document = yaml.safe_load(SERVE_CONFIG.read_text())
    (application,) = document["applications"]
    assert application["import_path"] == "serve.app:build_app"
    config = AppConfig.model_validate(application["args"])
    assert config.model.source == "demo"
    assert document["http_options"]["host"] == "127.0.0.1"


def test_unknown_keys_are_errors():
    with pytest.raises(ValidationError, match="max_model_length"):
        AppConfig.model_validate({"engine": {"max_model_length": 10}})


def test_autoscaling_bounds_are_ordered():
    with pytest.raises(ValidationError, match="min_replicas"):
        AppConfig.model_validate(
            {
                "deployments": {
                    "decoder": {"num_replicas": None, "autoscaling": {"min_replicas": 3, "max_replicas": 2}}
                }
            }
        )


def test_replicas_xor_autoscaling():
    with pytest.raises(ValidationError, match="not both"):
        AppConfig.model_validate({"deployments": {"decoder": {"num_replicas": 2, "autoscaling": {}}}})
    options = AppConfig.model_validate(
        {"deployments": {"decoder": {"num_replicas": None, "autoscaling": {"max_replicas": 4}}}}
    ).deployments.decoder.serve_options("decoder")
    assert options["autoscaling_config"]["max_replicas"] == 4
    assert "num_replicas" not in options


def test_served_name_defaults():
    assert AppConfig().model.name == "ministral-3-demo"
    assert AppConfig.model_validate(
        {"model": {"source": "mistralai/Ministral-3-3B-Instruct-2512"}}
    ).model.name == ("mistralai/Ministral-3-3B-Instruct-2512")
    assert (
        AppConfig.model_validate({"model": {"source": "/models/my-ministral/"}}).model.name == "my-ministral"
    )


def shared_gpu(encoder: float, decoder: float, utilization: float) -> dict:
    return {
        "engine": {"gpu_memory_utilization": utilization},
        "deployments": {"encoder": {"num_gpus": encoder}, "decoder": {"num_gpus": decoder}},
    }


def test_encoder_and_decoder_share_one_gpu_only_when_they_fit():
    config = AppConfig.model_validate(shared_gpu(0.1, 0.9, 0.85))
    assert config.deployments.encoder_shares_decoder_gpu
    with pytest.raises(ValidationError, match="sum to at most 1"):
        AppConfig.model_validate(shared_gpu(0.2, 0.9, 0.7))
    with pytest.raises(ValidationError, match=r"gpu_memory_utilization \(0.95\) must be at most 0.90"):
        AppConfig.model_validate(shared_gpu(0.1, 0.9, 0.95))
    # On separate GPUs the decoder may use its whole card.
    assert not AppConfig.model_validate(shared_gpu(1, 1, 0.95)).deployments.encoder_shares_decoder_gpu


def test_the_application_builder_takes_one_argument_as_serve_requires():
    import inspect

    from serve.app import build_app

    # `serve deploy` refuses a builder with more parameters (DEPLOY_FAILED).
    assert len(inspect.signature(build_app).parameters) == 1
