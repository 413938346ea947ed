"""`system_fingerprint` (deployments.engine_settings): what responses carry, that changes with the
checkpoint config, the engine settings or the software (README), and with nothing else."""

from __future__ import annotations

import importlib.metadata
import re

import pytest
import vllm

from deployments.engine_settings import system_fingerprint
from serve.config import EngineConfig

CHECKPOINT = {"architectures": ["Mistral3ForConditionalGeneration"], "text_config": {"hidden_size": 64}}


def test_equal_inputs_give_the_same_fingerprint():
    first = system_fingerprint(CHECKPOINT, EngineConfig())
    # Equal, not identical, inputs: a copy of the config, its keys in another order.
    reordered = dict(reversed(list(CHECKPOINT.items())))
    assert system_fingerprint(reordered, EngineConfig()) == first
    assert re.fullmatch(r"fp_[0-9a-f]{12}", first)


@pytest.mark.parametrize(
    "checkpoint",
    [
        {**CHECKPOINT, "text_config": {"hidden_size": 128}},
        {**CHECKPOINT, "torch_dtype": "bfloat16"},
        {key: value for key, value in CHECKPOINT.items() if key != "text_config"},
    ],
)
def test_a_changed_checkpoint_config_changes_the_fingerprint(checkpoint):
    assert system_fingerprint(checkpoint, EngineConfig()) != system_fingerprint(CHECKPOINT, EngineConfig())


@pytest.mark.parametrize(
    "setting", [{"max_model_len": 8192}, {"dtype": "float32"}, {"enable_prefix_caching": False}]
)
def test_a_changed_engine_setting_changes_the_fingerprint(setting):
    changed = EngineConfig(**setting)
    assert changed != EngineConfig()
    assert system_fingerprint(CHECKPOINT, changed) != system_fingerprint(CHECKPOINT, EngineConfig())


def test_a_changed_version_of_the_service_or_of_vllm_changes_the_fingerprint(monkeypatch):
    before = system_fingerprint(CHECKPOINT, EngineConfig())
    versions = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata,
        "version",
        lambda name: "99.0.0" if name == "ministral-serve" else versions(name),
    )
    new_service = system_fingerprint(CHECKPOINT, EngineConfig())
    monkeypatch.setattr(vllm, "__version__", "99.0.0")
    new_service_and_vllm = system_fingerprint(CHECKPOINT, EngineConfig())
    assert len({before, new_service, new_service_and_vllm}) == 3
    monkeypatch.undo()
    monkeypatch.setattr(vllm, "__version__", "99.0.0")
    assert system_fingerprint(CHECKPOINT, EngineConfig()) not in (before, new_service, new_service_and_vllm)
