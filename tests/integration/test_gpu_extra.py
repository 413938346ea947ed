"""The GPU install (`scripts/install.sh gpu`, which the Dockerfile runs) resolves: pip's resolver,
run against the package index alone, finds every pin of the `gpu` extra together (vLLM's CUDA
build, the torch it needs, Ray, transformers). Nothing is downloaded but metadata, and nothing is
installed (`--dry-run`); no GPU machine could be had to try the install itself."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[2]


def pinned(requirement_name: str) -> str:
    """The version pyproject.toml pins `requirement_name` to, in the dependencies or an extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"].values()
    requirements = [*project["dependencies"], *(requirement for extra in extras for requirement in extra)]
    for requirement in requirements:
        match = re.fullmatch(rf"{re.escape(requirement_name)}(\[[^\]]*\])?==(\S+)", requirement)
        if match:
            return match.group(2)
    raise AssertionError(f"{requirement_name} is not pinned in pyproject.toml")


def test_the_gpu_extra_resolves_from_the_package_index(tmp_path):
    report = tmp_path / "report.json"
    # The index alone: this machine's own wheel folder and pip settings (a CPU torch, caps on
    # versions) would stand in for what a GPU machine gets.
    environment = {name: value for name, value in os.environ.items() if not name.startswith("PIP_")}
    environment["PIP_CONFIG_FILE"] = os.devnull
    result = subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
            "--disable-pip-version-check", "--report", str(report), ".[gpu]",
        ],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    chosen = {
        entry["metadata"]["name"].lower(): entry["metadata"]["version"]
        for entry in json.loads(report.read_text())["install"]
    }
    assert chosen["vllm"] == pinned("vllm")
    assert chosen["ray"] == pinned("ray")
    assert chosen["transformers"] == pinned("transformers")
    # vLLM's CUDA build takes PyPI's torch, a CUDA build (the CPU one is "+cpu", from PyTorch's index).
    assert "+cpu" not in chosen["torch"]
    assert "triton" in chosen
