"""The console entry points, and the code style the project holds itself to."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
