"""The chart's pods run the front door that `ministral-serve run` runs, with the same settings.

The environment is compared with what `ministral-serve run` itself puts in its environment before
it starts Ray (its `_run`, stopped at `ray.init`), and the launcher the chart mounts is run as Ray
runs it in a pod: it hardens the config Ray writes, then a real HAProxy checks the result.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import helm_python as helm
import pytest
import ray

from serve import cli
from serve.front_door import HARDENED, TUNABLE
from tests.unit.test_front_door import rays_config
from tests.unit.test_helm_chart import CHART, ROOT, groups, one, render


@pytest.fixture(scope="module")
def chart() -> helm.Chart:
    return helm.Chart.load(CHART)


# What `run` sets that a pod must not: it keeps a single machine's Ray on loopback, where a
# pod's Ray must listen on the pod's address for the other pods.
SINGLE_MACHINE_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
# What the chart adds for reasons of its own (the model cache, the keys).
CHART_ONLY = {"HF_HOME", "HF_TOKEN", "MINISTRAL_API_KEYS"}


class _RayStarts(Exception):
    pass


def what_run_sets(monkeypatch, front_door: str) -> dict[str, str]:
    """The variables `ministral-serve run --layout 1gpu --front-door FRONT_DOOR` sets, as Ray's
    processes would inherit them: its environment at `ray.init`, less the caller's."""
    for variable in TUNABLE:
        monkeypatch.delenv(variable, raising=False)
    before = dict(os.environ)
    seen = {}

    def init(*args, **kwargs):
        seen.update(os.environ)
        raise _RayStarts

    monkeypatch.setattr(ray, "init", init)
    args = argparse.Namespace(
        layout="1gpu",
        config=None,
        model=None,
        host="127.0.0.1",
        port=8000,
        front_door=front_door,
        metrics_port=8080,
    )
    try:
        with pytest.raises(_RayStarts):
            cli._run(args)
    finally:
        os.environ.clear()
        os.environ.update(before)
    return {name: value for name, value in seen.items() if before.get(name) != value}


def pod_environments(rayservice: dict) -> list[dict[str, dict]]:
    return [
        {e["name"]: e for e in group["template"]["spec"]["containers"][0]["env"]}
        for group in groups(rayservice)
    ]


@pytest.mark.parametrize("front_door", ["haproxy", "serve-proxy"])
def test_head_and_workers_get_the_environment_that_run_sets(chart, monkeypatch, front_door):
    run = what_run_sets(monkeypatch, front_door)
    assert run.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0"
    rayservice = one(render(chart, {"frontDoor": front_door}), "RayService")
    for env in pod_environments(rayservice):
        expected = dict(run)
        rendered = {name: e["value"] for name, e in env.items() if name not in CHART_ONLY}
        if front_door == "haproxy":
            # The same files, in the pod's own folder instead of run's temporary one, and the
            # launcher from the chart's ConfigMap instead of one written into that folder.
            run_folder = run["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"]
            pod_folder = rendered["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"]
            assert not pod_folder.startswith(run_folder) and len(pod_folder) <= 27
            rendered = {name: value.replace(pod_folder, run_folder) for name, value in rendered.items()}
            assert rendered.pop("RAY_SERVE_HAPROXY_BINARY_PATH").startswith("/etc/ministral-serve/")
            assert Path(expected.pop("RAY_SERVE_HAPROXY_BINARY_PATH")).parent == Path(run_folder)
        assert rendered == expected
    assert run["RAY_SERVE_ENABLE_HA_PROXY"] == ("1" if front_door == "haproxy" else "0")


def test_extra_env_changes_only_what_run_lets_a_caller_change(chart):
    extra = [
        {"name": "RAY_SERVE_HAPROXY_NBTHREAD", "value": "4"},
        {"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    ]
    rayservice = one(render(chart, {"extraEnv": extra}), "RayService")
    for group in groups(rayservice):
        env = group["template"]["spec"]["containers"][0]["env"]
        names = [e["name"] for e in env]
        # Replaced where it was, not set twice; the others added at the end.
        assert names.count("RAY_SERVE_HAPROXY_NBTHREAD") == 1
        assert {"name": "RAY_SERVE_HAPROXY_NBTHREAD", "value": "4"} in env
        assert env[-2:] == extra[1:]
    with pytest.raises(helm.HelmRenderError) as failure:
        render(chart, {"extraEnv": [{"name": "RAY_SERVE_HAPROXY_SOCKET_PATH", "value": "/tmp/a.sock"}]})
    assert "extraEnv sets RAY_SERVE_HAPROXY_SOCKET_PATH, which the front door fixes" in str(failure.value)
    assert "RAY_SERVE_HAPROXY_NBTHREAD" in str(failure.value)


def test_the_chart_reads_the_generated_front_door_file(tmp_path):
    # One source: `ministral-serve configs` writes it from serve/front_door.py; the chart only reads it.
    subprocess.run(
        [sys.executable, "-m", "serve", "configs", "--directory", str(tmp_path)], check=True, timeout=120
    )
    generated = tmp_path / "front-door.json"
    assert generated.read_text() == (ROOT / "serve" / "configs" / "front-door.json").read_text()
    assert "RAY_SERVE" not in "".join(
        path.read_text() for path in (ROOT / "helm" / "ministral-serve" / "templates").iterdir()
    )


@pytest.fixture
def short_tmp_path():
    # HAProxy's socket paths hold 97 bytes at most: a folder as short as the pod's.
    with tempfile.TemporaryDirectory(prefix="ms-", dir="/tmp") as folder:
        yield Path(folder)


def test_the_pods_launcher_hardens_rays_config_and_haproxy_accepts_it(chart, short_tmp_path):
    """The launcher of the chart's ConfigMap, run as Ray runs it in a pod: its own path in
    RAY_SERVE_HAPROXY_BINARY_PATH, `python` from PATH, then Ray's own HAProxy in check mode."""
    tmp_path = short_tmp_path
    objects = render(chart)
    (config_map,) = [
        o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("front-door")
    ]
    rayservice = one(objects, "RayService")
    env = {name: e["value"] for name, e in pod_environments(rayservice)[0].items() if "value" in e}
    pod_folder = env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"]
    environment = {name: value.replace(pod_folder, str(tmp_path)) for name, value in env.items()}
    launcher = tmp_path / Path(env["RAY_SERVE_HAPROXY_BINARY_PATH"]).name
    (script,) = config_map["data"].values()
    launcher.write_text(script)
    # The ConfigMap volume's mode.
    mode = next(v for v in groups(rayservice)[0]["template"]["spec"]["volumes"] if v["name"] == "front-door")
    launcher.chmod(mode["configMap"]["defaultMode"])
    assert os.access(launcher, os.X_OK) and not launcher.stat().st_mode & stat.S_IWUSR
    config = rays_config(environment, host="0.0.0.0")
    (config.parent / "server-state").touch()
    result = subprocess.run(
        [str(launcher), "-c", "-f", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        env={
            **os.environ,
            "RAY_SERVE_HAPROXY_BINARY_PATH": str(launcher),
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "PYTHONPATH": str(ROOT),
        },
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Configuration file is valid" in result.stdout + result.stderr
    assert config.read_text().startswith(HARDENED)


def test_the_front_door_file_lists_each_front_door_of_run():
    document = json.loads((ROOT / "serve" / "configs" / "front-door.json").read_text())
    assert set(document["environment"]) == set(cli.FRONT_DOORS)
    assert set(document["tunable"]) == set(TUNABLE)
