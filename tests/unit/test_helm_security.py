"""The chart's pods against Kubernetes' "restricted" Pod Security Standard, field by field.

The rules are the standard's own table (kubernetes.io/docs/concepts/security/pod-security-standards,
policy version 1.33: the baseline controls plus the restricted ones), checked on the Pods that
KubeRay would make from the RayService (`kuberay_pods`: its autoscaler sidecar and init container
included), for every layout and with every option that adds a container or a volume.
"""

from __future__ import annotations

import json
import posixpath

import helm_python as helm
import pytest

from serve.layouts import LAYOUTS
from tests.unit.test_helm_chart import CHART, ROOT, kuberay_pods, one, render


@pytest.fixture(scope="module")
def chart() -> helm.Chart:
    return helm.Chart.load(CHART)


# Volume types the restricted profile allows.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
# Everything the chart turns on that changes a pod: the autoscaler sidecar, the model volume,
# the Serve proxy front door, a runtime and priority class.
EVERYTHING = {
    "rayAutoscaling": {"enabled": True},
    "model": {"cache": {"create": True}},
    "runtimeClassName": "nvidia",
    "priorityClassName": "inference",
    "gcsFaultTolerance": {"enabled": True, "redisAddress": "redis:6379"},
}


def restricted_violations(pod: dict) -> list[str]:
    """Where `pod` breaks the restricted Pod Security Standard (baseline controls included)."""
    spec = pod["spec"]
    pod_context = spec.get("securityContext", {})
    containers = [*spec.get("initContainers", []), *spec["containers"], *spec.get("ephemeralContainers", [])]
    found = []
    # Baseline: host namespaces, host paths and ports, privileged, capabilities, /proc, sysctls.
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            found.append(f"spec.{field}")
    if pod_context.get("windowsOptions", {}).get("hostProcess"):
        found.append("spec.securityContext.windowsOptions.hostProcess")
    for sysctl in pod_context.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            found.append(f"sysctl {sysctl['name']}")
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']}: {sorted(kinds - RESTRICTED_VOLUMES)}")
    # Pod-level settings that every container inherits unless it sets its own.
    pod_non_root = pod_context.get("runAsNonRoot")
    pod_seccomp = pod_context.get("seccompProfile", {}).get("type")
    if pod_context.get("runAsUser") == 0:
        found.append("spec.securityContext.runAsUser is 0")
    if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
        found.append(f"spec.securityContext.seccompProfile {pod_seccomp}")
    if pod_context.get("appArmorProfile", {}).get("type") == "Unconfined":
        found.append("spec.securityContext.appArmorProfile Unconfined")
    for container in containers:
        where = f"container {container['name']}"
        context = container.get("securityContext", {})
        if context.get("privileged"):
            found.append(f"{where}: privileged")
        if context.get("windowsOptions", {}).get("hostProcess"):
            found.append(f"{where}: hostProcess")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            found.append(f"{where}: hostPort")
        if context.get("procMount", "Default") != "Default":
            found.append(f"{where}: procMount")
        if context.get("appArmorProfile", {}).get("type") == "Unconfined":
            found.append(f"{where}: appArmorProfile Unconfined")
        # Restricted.
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{where}: allowPrivilegeEscalation is not false")
        non_root = context.get("runAsNonRoot", pod_non_root)
        if non_root is not True:
            found.append(f"{where}: runAsNonRoot is not true")
        if context.get("runAsUser") == 0:
            found.append(f"{where}: runAsUser is 0")
        seccomp = context.get("seccompProfile", {}).get("type", pod_seccomp)
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{where}: seccompProfile is {seccomp}")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            found.append(f"{where}: capabilities do not drop ALL")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{where}: capabilities add {capabilities['add']}")
    return found


def test_the_check_finds_what_the_standard_refuses():
    # A pod as the chart rendered it before: pod-level non-root only, no container context.
    pod = {
        "spec": {
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000},
            "hostNetwork": True,
            "volumes": [{"name": "docker", "hostPath": {"path": "/var/run/docker.sock"}}],
            "containers": [
                {"name": "ray", "securityContext": {"capabilities": {"add": ["SYS_ADMIN"], "drop": ["ALL"]}}},
                {"name": "sidecar", "ports": [{"containerPort": 80, "hostPort": 80}]},
            ],
        }
    }
    assert restricted_violations(pod) == [
        "spec.hostNetwork",
        "volume docker: ['hostPath']",
        "container ray: allowPrivilegeEscalation is not false",
        "container ray: seccompProfile is None",
        "container ray: capabilities add ['SYS_ADMIN']",
        "container sidecar: hostPort",
        "container sidecar: allowPrivilegeEscalation is not false",
        "container sidecar: seccompProfile is None",
        "container sidecar: capabilities do not drop ALL",
    ]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_every_container_of_every_layout_meets_the_restricted_profile(chart, name):
    pods = kuberay_pods(one(render(chart, {"layout": name, **EVERYTHING}), "RayService"))
    containers = {
        c["name"]
        for pod in pods
        for c in [*pod["spec"]["containers"], *pod["spec"].get("initContainers", [])]
    }
    assert containers == {"ray-head", "autoscaler", "ray-worker", "wait-gcs-ready"}
    for pod in pods:
        assert restricted_violations(pod) == [], pod["metadata"]["name"]


@pytest.mark.parametrize("values", [{}, EVERYTHING, {"frontDoor": "serve-proxy"}])
def test_every_container_has_a_read_only_root_and_writes_only_to_its_own_empty_dirs(chart, values):
    rayservice = one(render(chart, values), "RayService")
    front_door = json.loads((ROOT / "serve" / "configs" / "front-door.json").read_text())
    for pod in kuberay_pods(rayservice):
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        for container in [*pod["spec"]["containers"], *pod["spec"].get("initContainers", [])]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, container["name"]
            writable = {
                m["mountPath"]
                for m in container["volumeMounts"]
                if not m.get("readOnly") and ("emptyDir" in volumes[m["name"]] or m["name"] == "model-cache")
            }
            # Ray's session dir and every temporary file.
            assert "/tmp" in writable, container["name"]
            if container["name"] == "autoscaler":
                continue
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            needed = [
                # Hugging Face's downloads (HF_HOME, else ~/.cache/huggingface), vLLM's and
                # torch.compile's caches, Triton's and CUDA's kernel caches, vLLM's config, ~/.ray.
                env.get("HF_HOME", "/home/ray/.cache/huggingface"),
                "/home/ray/.cache/vllm",
                "/home/ray/.triton/cache",
                "/home/ray/.nv/ComputeCache",
                "/home/ray/.config/vllm",
                "/home/ray/.ray/auth_token",
            ]
            if "RAY_SERVE_HAPROXY_SERVER_STATE_BASE" in env:
                needed.append(env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"])
            for path in needed:
                assert any(posixpath.commonpath([path, mount]) == mount for mount in writable), (
                    container["name"],
                    path,
                )
            # The front door's launcher: on a read-only ConfigMap volume, executable.
            if values.get("frontDoor", "haproxy") == "haproxy":
                launcher = front_door["launcher"]["path"]
                assert env["RAY_SERVE_HAPROXY_BINARY_PATH"] == launcher
                (mount,) = [
                    m for m in container["volumeMounts"] if m["mountPath"] == posixpath.dirname(launcher)
                ]
                assert mount["readOnly"] is True
                config_map = volumes[mount["name"]]["configMap"]
                assert config_map["defaultMode"] & 0o111 == 0o111


def test_the_pods_carry_no_kubernetes_api_token_but_the_autoscaler_gets_its_own(chart):
    objects = render(chart, {"rayAutoscaling": {"enabled": True}})
    assert one(objects, "ServiceAccount")["automountServiceAccountToken"] is False
    head, worker = kuberay_pods(one(objects, "RayService"))
    for pod in (head, worker):
        assert pod["spec"]["automountServiceAccountToken"] is False
        assert pod["spec"]["serviceAccountName"] == one(objects, "ServiceAccount")["metadata"]["name"]
    volumes = {v["name"]: v for v in head["spec"]["volumes"]}
    token_mounts = {
        c["name"]
        for c in head["spec"]["containers"]
        for m in c["volumeMounts"]
        if m["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount"
    }
    assert token_mounts == {"autoscaler"}
    sources = volumes["autoscaler-api-access"]["projected"]["sources"]
    assert [next(iter(s)) for s in sources] == ["serviceAccountToken", "configMap", "downwardAPI"]
    # Without the autoscaler there is no token at all; asked for, the kubelet mounts it everywhere.
    head, _ = kuberay_pods(one(render(chart), "RayService"))
    assert "autoscaler-api-access" not in {v["name"] for v in head["spec"]["volumes"]}
    objects = render(
        chart, {"rayAutoscaling": {"enabled": True}, "serviceAccount": {"automountServiceAccountToken": True}}
    )
    head, _ = kuberay_pods(one(objects, "RayService"))
    assert head["spec"]["automountServiceAccountToken"] is True
    assert "autoscaler-api-access" not in {v["name"] for v in head["spec"]["volumes"]}


def test_values_that_loosen_the_profile_show_up_in_the_check(chart):
    values = {
        "containerSecurityContext": {
            "allowPrivilegeEscalation": True,
            "capabilities": {"add": ["NET_ADMIN"]},
            "seccompProfile": None,
        },
        "securityContext": {"seccompProfile": None},
        "rayAutoscaling": {"enabled": True},
    }
    head, worker = kuberay_pods(one(render(chart, values), "RayService"))
    assert restricted_violations(head) == [
        f"container {name}: {problem}"
        for name in ("ray-head", "autoscaler")
        for problem in (
            "allowPrivilegeEscalation is not false",
            "seccompProfile is None",
            "capabilities add ['NET_ADMIN']",
        )
    ]
    assert len(restricted_violations(worker)) == 6  # ray-worker and wait-gcs-ready
