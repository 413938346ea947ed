"""The GPU install (`scripts/install.sh gpu`, which the Dockerfile runs) resolves: pip's resolver,
run against the package index alone under constraints/gpu.txt, finds every pin of the `gpu` extra
together (vLLM's CUDA build, the torch it needs, Ray, transformers), and the constraints fix every
package it takes. Nothing is downloaded but metadata, and nothing is installed (`--dry-run`); no
GPU machine could be had to try the install itself."""

from __future__ import annotations

import importlib.util
import re
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


def gpu_constraints():
    """scripts/gpu_constraints.py, which writes constraints/gpu.txt (a script, not a package)."""
    spec = importlib.util.spec_from_file_location("gpu_constraints", ROOT / "scripts" / "gpu_constraints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_extra_resolves_from_the_package_index_under_its_constraints():
    constraints = gpu_constraints()
    chosen = constraints.resolved(constraints.CONSTRAINTS)
    assert chosen["vllm"] == pinned("vllm")
    assert chosen["ray"] == pinned("ray")
    assert chosen["transformers"] == pinned("transformers")
    # vLLM's CUDA build takes PyPI's torch, a CUDA build (the CPU one is "+cpu", from PyTorch's index).
    assert "+cpu" not in chosen["torch"]
    assert "triton" in chosen
    # The constraints fix every package the install takes, and only those: a pin changed in
    # pyproject.toml without running the script fails above (no resolution) or here.
    assert constraints.constraints_text(chosen) == constraints.CONSTRAINTS.read_text(), (
        "constraints/gpu.txt is out of date: run .venv/bin/python scripts/gpu_constraints.py"
    )
