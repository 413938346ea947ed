"""checkov, offline, over everything the chart renders and the Pods KubeRay makes from it.

checkov (pinned with all it pulls in, tests/data/checkov/requirements.txt) runs in a virtualenv of
its own, which this module makes once under .venv/: its pins would downgrade the project's. It
runs with --skip-download and its update check off, and every Python process it starts loads
tests/data/checkov/sitecustomize.py, which refuses and records any attempt to reach the network.
checkov does not look inside custom resources, so the RayService's head and worker templates go
in as the Pods KubeRay would make (`kuberay_pods`).

One checkov run covers every layout with the production values of docs/kubernetes.md
(PRODUCTION) and, as a control, one layout with the chart's security settings taken away.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import helm_python as helm
import pytest
import yaml
from filelock import FileLock

from serve.layouts import LAYOUTS
from tests.unit.test_helm_chart import CHART, ROOT, kuberay_pods, one, render


@pytest.fixture(scope="module")
def chart() -> helm.Chart:
    return helm.Chart.load(CHART)


CHECKOV = ROOT / "tests" / "data" / "checkov"
REQUIREMENTS = CHECKOV / "requirements.txt"
SKIPS = yaml.safe_load((CHECKOV / "skips.yaml").read_text())
# The production checklist of docs/kubernetes.md, and every object the chart can render.
PRODUCTION = {
    "image": {"repository": "registry.example.com/ministral-serve", "digest": "sha256:" + "0123abcd" * 8},
    "model": {"cache": {"create": True, "storageClassName": "shared-rwx"}},
    "gcsFaultTolerance": {
        "enabled": True,
        "redisAddress": "redis.llm.svc:6379",
        "redisPassword": {"secretName": "redis-password"},
    },
    "rayAutoscaling": {"enabled": True},
    "runtimeClassName": "nvidia",
    "monitoring": {
        "podMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "dashboards": {"enabled": True},
    },
    "ingress": {
        "enabled": True,
        "className": "nginx",
        "hosts": [{"host": "llm.example.com"}],
        "tls": [{"secretName": "llm-example-com-tls", "hosts": ["llm.example.com"]}],
    },
    "httpRoute": {"enabled": True, "parentRefs": [{"name": "shared", "namespace": "gateway-system"}]},
}
# The control: the pods as the chart rendered them before issue 32 (null takes a default away).
LOOSENED = {
    "apiKeys": {"secretName": "ministral-keys"},
    "securityContext": {"seccompProfile": None, "fsGroupChangePolicy": None},
    "containerSecurityContext": None,
    "networkPolicy": {"enabled": False},
    "serviceAccount": {"create": False, "automountServiceAccountToken": True},
}


def checkov_python() -> Path:
    """The checkov virtualenv's Python, made first if need be (about 40 s, once per requirements file)."""
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:16]
    venv = ROOT / ".venv" / f"checkov-{digest}"
    python = venv / "bin" / "python"
    venv.parent.mkdir(exist_ok=True)
    with FileLock(f"{venv}.lock"):
        if not (venv / ".complete").exists():
            for stale in venv.parent.glob("checkov-*"):
                if stale.is_dir():
                    shutil.rmtree(stale)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
            install = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
            result = subprocess.run(
                [*install, "--no-deps", "-r", str(REQUIREMENTS)], capture_output=True, text=True, timeout=900
            )
            assert result.returncode == 0, result.stderr[-3000:]
            (venv / ".complete").touch()
    return python


def run_checkov(directory: Path, attempts: Path) -> dict:
    environment = {
        key: value
        for key, value in os.environ.items()
        # No platform key, no proxy settings that could lead it anywhere.
        if not key.startswith(("BC_", "CKV_", "PRISMA_")) and "PROXY" not in key.upper()
    }
    environment.update(
        CKV_SKIP_PACKAGE_UPDATE_CHECK="true",
        BC_SKIP_MAPPING="TRUE",
        PYTHONPATH=str(CHECKOV),
        NETWORK_ATTEMPTS_FILE=str(attempts),
    )
    command = [
        str(checkov_python()),
        "-m",
        "checkov.main",
        "--directory",
        str(directory),
        "--framework",
        "kubernetes",
        "--skip-download",
        "--output",
        "json",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env=environment, cwd=directory
    )
    # 1: some check failed; anything else is checkov itself failing.
    assert result.returncode in (0, 1), result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["check_type"] == "kubernetes" and report["summary"]["parsing_errors"] == 0
    return report


@pytest.fixture(scope="module")
def checked(chart, tmp_path_factory):
    """checkov's results by file (production/<layout>.yaml, loosened.yaml): {file: {(check, resource):
    "passed"|"failed"}}, the objects written to each file, and the network attempts."""
    directory = tmp_path_factory.mktemp("checkov")
    written = {}
    (directory / "production").mkdir()
    for name in LAYOUTS:
        objects = render(chart, {"layout": name, **PRODUCTION})
        written[f"/production/{name}.yaml"] = [*objects, *kuberay_pods(one(objects, "RayService"))]
    # Another release: the production files' NetworkPolicies must not select its pods.
    objects = [
        document
        for path, text in chart.render(LOOSENED, name="before", namespace="llm").items()
        if not path.endswith("NOTES.txt")
        for document in yaml.safe_load_all(text)
        if document
    ]
    written["/loosened.yaml"] = [*objects, *kuberay_pods(one(objects, "RayService"))]
    for path, manifests in written.items():
        (directory / path.lstrip("/")).write_text(yaml.safe_dump_all(manifests))
    attempts = directory.parent / "network-attempts"
    report = run_checkov(directory, attempts)
    results = defaultdict(dict)
    names = {}
    for outcome in ("passed", "failed"):
        for check in report["results"][f"{outcome}_checks"]:
            results[check["file_path"]][check["check_id"], check["resource"]] = outcome
            names[check["check_id"]] = check["check_name"]
    network = attempts.read_text().splitlines() if attempts.exists() else []
    return results, written, names, network


def failed(results: dict[tuple[str, str], str]) -> dict[str, set[str]]:
    by_check = defaultdict(set)
    for (check, resource), outcome in results.items():
        if outcome == "failed":
            by_check[check].add(resource)
    return by_check


def test_checkov_reached_nothing_on_the_network(checked):
    *_, network = checked
    assert network == []


def test_the_network_guard_records_what_it_refuses(tmp_path):
    attempts = tmp_path / "attempts"
    probe = (
        "import socket\n"
        "try:\n    socket.create_connection(('pypi.org', 443), timeout=1)\n"
        "except OSError:\n    pass\n"
    )
    environment = {**os.environ, "PYTHONPATH": str(CHECKOV), "NETWORK_ATTEMPTS_FILE": str(attempts)}
    subprocess.run([str(checkov_python()), "-c", probe], env=environment, check=True, timeout=60)
    assert attempts.read_text().split(maxsplit=1)[1] == "getaddrinfo 'pypi.org'\n"


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_every_layout_fails_only_the_listed_checks(checked, name):
    results, written, names, _ = checked
    path = f"/production/{name}.yaml"
    # checkov read every object of its kinds: the Pods, and the ConfigMaps, Ingress and the rest.
    checked_resources = {resource for _, resource in results[path]}
    pods = {f"Pod.llm.{o['metadata']['name']}" for o in written[path] if o["kind"] == "Pod"}
    assert len(pods) == 2 and pods <= checked_resources
    assert {resource.split(".")[0] for resource in checked_resources} == {
        "Pod",
        "ConfigMap",
        "Ingress",
        "ServiceAccount",
    }
    # Only the listed checks fail, and each of them on the Pods alone.
    assert set(failed(results[path])) == set(SKIPS), {c: names[c] for c in failed(results[path])}
    for check, resources in failed(results[path]).items():
        assert resources <= pods, check


def test_the_skips_name_checkovs_checks_and_say_why(checked):
    _, _, names, _ = checked
    assert len(SKIPS) <= 5
    for check, skip in SKIPS.items():
        assert skip["name"] == names[check]
        assert len(skip["reason"].split()) >= 15, check


def test_checkov_catches_the_chart_without_its_security_settings(checked):
    """The control: the pod security that issue 32 found missing, taken away again."""
    results, *_ = checked
    newly_failed = set(failed(results["/loosened.yaml"])) - set(SKIPS)
    assert {
        "CKV_K8S_20",  # allowPrivilegeEscalation
        "CKV_K8S_22",  # read-only root filesystem
        "CKV_K8S_28",  # NET_RAW
        "CKV_K8S_30",  # a container securityContext
        "CKV_K8S_31",  # seccomp
        "CKV_K8S_37",  # capabilities
        "CKV_K8S_38",  # service account token
        "CKV_K8S_43",  # image digest
        "CKV2_K8S_6",  # NetworkPolicy
    } <= newly_failed
