"""The Dockerfile, linted by hadolint (no container daemon here to build it)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
HADOLINT = Path(sys.executable).with_name("hadolint")


def test_the_dockerfile_lints_clean():
    result = subprocess.run(
        [str(HADOLINT), "--failure-threshold", "info", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_linter_catches_what_it_is_here_for(tmp_path):
    # Running as root, and an unpinned apt install: both must be reported.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:13\nRUN apt-get update && apt-get install -y curl\nUSER root\n")
    result = subprocess.run([str(HADOLINT), str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3008" in result.stdout and "DL3002" in result.stdout


def test_the_image_runs_as_a_non_root_user_and_leaves_local_state_out():
    dockerfile = (ROOT / "Dockerfile").read_text().splitlines()
    final_stage = dockerfile[max(i for i, line in enumerate(dockerfile) if line.startswith("FROM ")) :]
    (user,) = [line.split()[1] for line in final_stage if line.startswith("USER ")]
    assert user.split(":")[0] not in {"0", "root"}
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", ".git", "benchmarks/results", "**/__pycache__"} <= ignored
