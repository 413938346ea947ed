"""Writes constraints/gpu.txt: every package `scripts/install.sh gpu` installs, at the version pip's
resolver picks for the `gpu` extra from the package index alone (metadata only, nothing installed).

install.sh installs the GPU extra under these constraints, so that the image gets the same
transitive versions whenever it is built; tests/integration/test_gpu_extra.py checks that they
still resolve and are complete. Run with the project's venv after changing a pin:
    .venv/bin/python scripts/gpu_constraints.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).parents[1]
CONSTRAINTS = ROOT / "constraints" / "gpu.txt"
PROJECT = "ministral-serve"
HEADER = (
    "# Every package of `scripts/install.sh gpu` (the Dockerfile's), as pip resolves the gpu extra\n"
    "# from the package index alone. Written by scripts/gpu_constraints.py; do not edit by hand.\n"
)


def resolved(constraints: Path | None = None) -> dict[str, str]:
    """Package name -> version that pip would install for `.[gpu]` (under `constraints`, if given)."""
    # The index alone: a machine's own wheel folder and pip settings (a CPU torch, caps on
    # versions) would stand in for what a GPU machine gets.
    environment = {name: value for name, value in os.environ.items() if not name.startswith("PIP_")}
    environment["PIP_CONFIG_FILE"] = os.devnull
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.json"
        command = [
            sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
            "--disable-pip-version-check", "--report", str(report), ".[gpu]",
        ]  # fmt: skip
        if constraints is not None:
            command += ["--constraint", str(constraints)]
        result = subprocess.run(
            command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300
        )
        if result.returncode != 0:
            raise RuntimeError(f"pip could not resolve .[gpu]:\n{result.stderr[-3000:]}")
        return {
            entry["metadata"]["name"].lower(): entry["metadata"]["version"]
            for entry in json.loads(report.read_text())["install"]
            if entry["metadata"]["name"].lower() != PROJECT
        }


def constraints_text(versions: dict[str, str]) -> str:
    return HEADER + "".join(f"{name}=={version}\n" for name, version in sorted(versions.items()))


def main() -> None:
    CONSTRAINTS.parent.mkdir(exist_ok=True)
    CONSTRAINTS.write_text(constraints_text(resolved()))
    print(f"wrote {CONSTRAINTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
