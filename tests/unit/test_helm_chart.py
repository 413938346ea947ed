"""The Helm chart, rendered by Helm's own engine (its Go SDK) and checked against the schemas of each kind.

Built-in kinds validate against Kubernetes' published schemas
(kubernetes-validate); the RayService against KubeRay's CRD, the PodMonitor
and PrometheusRule against the Prometheus Operator's, the HTTPRoute against
Gateway API's (tests/data/crds/). The helpers here (render, validate,
kuberay_pods) serve the chart's other test files too (test_helm_*.py).
"""

from __future__ import annotations

import json
import re
import tomllib
from functools import cache
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

from serve.config import AppConfig
from serve.layouts import LAYOUTS

ROOT = Path(__file__).parents[2]
CHART = ROOT / "helm" / "ministral-serve"
CRDS = ROOT / "tests" / "data" / "crds"
KUBERNETES_VERSION = "1.33.0"
CRD_FILES = {
    ("ray.io/v1", "RayService"): "ray.io_rayservices.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "gateway.networking.k8s.io_httproutes.yaml",
}
# What every install renders besides the monitoring objects: the RayService, the front door's
# launcher (ConfigMap), the pods' ServiceAccount, their NetworkPolicy and PodDisruptionBudgets.
BASE_KINDS = {"RayService", "ConfigMap", "ServiceAccount", "NetworkPolicy", "PodDisruptionBudget"}
ALL_MONITORING = {
    "monitoring": {
        "podMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
        "dashboards": {"enabled": True},
    }
}


# The chart renders only with API keys, or told to serve the API open.
WITH_KEYS = {"apiKeys": {"secretName": "ministral-keys"}}


@pytest.fixture(scope="module")
def chart() -> helm.Chart:
    return helm.Chart.load(CHART)


def render(chart: helm.Chart, values: dict | None = None, keys: bool = True) -> list[dict]:
    values = {**WITH_KEYS, **(values or {})} if keys else (values or {})
    manifests = chart.render(values, name="prod", namespace="llm", is_install=True)
    return [
        document
        for path, text in manifests.items()
        if not path.endswith("NOTES.txt")
        for document in yaml.safe_load_all(text)
        if document
    ]


def one(objects: list[dict], kind: str) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def _go_pattern(validator, pattern: str, instance, schema):
    """`pattern` as Kubernetes reads it (Go's RE2): a flag group such as (?i) may follow the ^."""
    if not isinstance(instance, str):
        return
    flags = 0
    if "(?i)" in pattern:
        pattern, flags = pattern.replace("(?i)", ""), re.IGNORECASE
    if not re.search(pattern, instance, flags):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


CrdValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"pattern": _go_pattern})


@cache
def crd_validator(api_version: str, kind: str) -> jsonschema.Validator:
    crd = yaml.safe_load((CRDS / CRD_FILES[api_version, kind]).read_text())
    version = api_version.split("/")[1]
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return CrdValidator(served["schema"]["openAPIV3Schema"])


def validate(manifest: dict) -> None:
    key = (manifest["apiVersion"], manifest["kind"])
    if key in CRD_FILES:
        crd_validator(*key).validate(manifest)
    else:
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def serve_config(rayservice: dict) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def workers(rayservice: dict) -> dict:
    (group,) = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return group


def groups(rayservice: dict) -> list[dict]:
    """The head group and the worker groups."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


def kuberay_pods(rayservice: dict) -> list[dict]:
    """The Pods KubeRay (1.5) makes from the RayService's templates, with what it adds to them that
    a check of the pods must see (ray-operator/controllers/ray/common/pod.go, BuildPod and
    DefaultWorkerPodTemplate): the autoscaler sidecar in the head, built from autoscalerOptions;
    the workers' wait-gcs-ready init container, which copies the Ray container's securityContext,
    env and mounts; /dev/shm as a memory emptyDir; node-type labels. Not added: its probes and the
    env it injects (RAY_ADDRESS, RAY_AUTH_TOKEN, ...)."""
    name = rayservice["metadata"]["name"]
    cluster = rayservice["spec"]["rayClusterConfig"]
    pods = []
    for node_type, group in [("head", cluster["headGroupSpec"])] + [
        ("worker", w) for w in cluster["workerGroupSpecs"]
    ]:
        template = json.loads(json.dumps(group["template"]))
        spec = template["spec"]
        ray = spec["containers"][0]
        spec.setdefault("volumes", []).append({"name": "shared-mem", "emptyDir": {"medium": "Memory"}})
        ray.setdefault("volumeMounts", []).append({"name": "shared-mem", "mountPath": "/dev/shm"})
        if node_type == "head" and cluster.get("enableInTreeAutoscaling"):
            options = cluster.get("autoscalerOptions", {})
            autoscaler = {
                "name": "autoscaler",
                "image": options.get("image", ray["image"]),
                "imagePullPolicy": options.get("imagePullPolicy", "IfNotPresent"),
                "command": ["/bin/bash", "-c", "--"],
                "args": ["ray kuberay-autoscaler --cluster-name $(RAY_CLUSTER_NAME)"],
                "resources": {"limits": {"cpu": "500m", "memory": "512Mi"}},
                "volumeMounts": [
                    *options.get("volumeMounts", []),
                    {"name": "ray-logs", "mountPath": "/tmp/ray"},
                ],
            }
            if "securityContext" in options:
                autoscaler["securityContext"] = options["securityContext"]
            spec["containers"].append(autoscaler)
            spec["volumes"].append({"name": "ray-logs", "emptyDir": {}})
            ray["volumeMounts"].append({"name": "ray-logs", "mountPath": "/tmp/ray"})
        if node_type == "worker":
            init = {
                "name": "wait-gcs-ready",
                "image": ray["image"],
                "imagePullPolicy": ray.get("imagePullPolicy"),
                "command": ["/bin/bash", "-c", "--"],
                "args": ["ray health-check --address $(FQ_RAY_IP):6379"],
                "env": ray.get("env", []),
                "volumeMounts": [m for m in ray["volumeMounts"] if m["name"] != "shared-mem"],
                "resources": {"limits": {"cpu": "200m", "memory": "256Mi"}},
            }
            if "securityContext" in ray:
                init["securityContext"] = ray["securityContext"]
            spec.setdefault("initContainers", []).append(init)
        labels = {
            **template["metadata"].get("labels", {}),
            "ray.io/node-type": node_type,
            "ray.io/cluster": name,
        }
        pod_name = f"{name}-head" if node_type == "head" else f"{name}-{group['groupName']}-worker"
        metadata = {
            **template["metadata"],
            "name": pod_name,
            "namespace": rayservice["metadata"]["namespace"],
        }
        pods.append(
            {"apiVersion": "v1", "kind": "Pod", "metadata": {**metadata, "labels": labels}, "spec": spec}
        )
    return pods


def cpus_asked(application_args: dict) -> float:
    """Logical CPUs the application's replicas take at most, as Ray counts them."""
    config = AppConfig.model_validate(application_args)
    total = 0.0
    for deployment in (config.deployments.ingress, config.deployments.preprocess, config.deployments.encoder):
        replicas = deployment.num_replicas or deployment.autoscaling.max_replicas
        total += replicas * deployment.num_cpus
    decoder = config.deployments.decoder
    return total + (decoder.num_replicas or decoder.autoscaling.max_replicas) * decoder.num_cpus


# Every option that adds an object or changes a pod, for lint and the README.
EVERY_OPTION = {
    **WITH_KEYS,
    **ALL_MONITORING,
    "image": {"digest": "sha256:" + "0" * 64},
    "model": {"cache": {"create": True}},
    "gcsFaultTolerance": {"enabled": True, "redisAddress": "redis:6379"},
    "rayAutoscaling": {"enabled": True},
    "ingress": {"enabled": True, "hosts": [{"host": "llm.example.com"}]},
    "httpRoute": {"enabled": True, "parentRefs": [{"name": "shared"}]},
    "extraEnv": [{"name": "VLLM_LOGGING_LEVEL", "value": "INFO"}],
    "auth": {"tenantsSecret": {"name": "ministral-tenants"}},
}


@pytest.mark.parametrize("values", [WITH_KEYS, EVERY_OPTION], ids=["defaults", "every-option"])
def test_the_chart_lints_clean(values):
    report = helm.lint(CHART, values, strict=True)
    assert report["errors"] == []
    # Severity 2 is a warning, 3 an error; 1 is advice (an icon).
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_the_readme_documents_every_value():
    """Every key of the schema, down to the second level, has a row in the README's table."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    table = (CHART / "README.md").read_text().split("## Values")[1].split("\n## ")[0]
    documented = set()
    for row in table.splitlines():
        if not row.startswith("| `"):
            continue
        # The key cell names its first key in full and its siblings by their last part (`.key`).
        names = re.findall(r"`([A-Za-z.]+)`", row.split(" | ")[0])
        parent = names[0].rpartition(".")[0]
        documented |= {f"{parent}{name}" if name.startswith(".") else name for name in names}
    expected = set()
    for key, entry in schema["properties"].items():
        children = entry.get("properties", {})
        if key == "global":
            continue
        leaves = [f"{key}.{child}" for child, sub in children.items() if "properties" not in sub]
        nested = [f"{key}.{child}" for child, sub in children.items() if "properties" in sub]
        expected |= set(leaves) if leaves else {key}
        # An object of objects: its objects are documented by a row of their own leaves.
        for name in nested:
            if not any(d.startswith(name) for d in documented):
                expected.add(name)
    assert sorted(expected - documented) == []


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_every_layout_renders_valid_objects_with_the_generated_serve_config(chart, name):
    objects = render(chart, {"layout": name})
    assert {o["kind"] for o in objects} == BASE_KINDS
    for manifest in objects:
        validate(manifest)
    rayservice = one(objects, "RayService")
    # The pods KubeRay would make are valid Pods too.
    for pod in kuberay_pods(rayservice):
        validate(pod)

    # serveConfigV2 is the generated file, not a re-typed copy, and Ray accepts it.
    rendered = serve_config(rayservice)
    assert rendered == yaml.safe_load((ROOT / "serve" / "configs" / f"{name}.yaml").read_text())
    ServeDeploySchema.model_validate(rendered)

    # The GPU workers hold every GPU of the layout, each TP group inside one pod.
    layout = LAYOUTS[name]
    group = workers(rayservice)
    (container,) = group["template"]["spec"]["containers"]
    gpus_per_worker = container["resources"]["limits"]["nvidia.com/gpu"]
    assert group["replicas"] * gpus_per_worker >= layout.gpus
    assert gpus_per_worker % layout.tensor_parallel == 0
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    # ... and the CPUs that the Serve config's replicas ask (the head offers none).
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    # ... nor GPUs, even on a GPU node.
    assert head["rayStartParams"]["num-gpus"] == "0"
    # Ray's control plane asks for a token (KubeRay generates it).
    assert rayservice["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}
    worker_cpus = float(container["resources"]["limits"]["cpu"])
    (application,) = rendered["applications"]
    assert group["replicas"] * worker_cpus >= cpus_asked(application["args"])


def test_gpus_per_worker_split_the_layout_across_pods(chart):
    group = workers(
        one(render(chart, {"layout": "4gpu-tp2pp2", "workers": {"gpusPerWorker": 2}}), "RayService")
    )
    assert group["replicas"] == 2
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"layout": "5gpu"}, "at '/layout': value must be one of"),
        ({"model": {"source": None}}, "missing property 'source'"),
        ({"model": {"source": ""}}, "at '/model/source': minLength"),
        ({"workers": {"replicas": -1}}, "at '/workers/replicas': minimum: got -1"),
        ({"workers": {"gpusPerWorker": 0}}, "at '/workers/gpusPerWorker': minimum: got 0"),
        ({"rayAutoscaling": {"enabled": "yes"}}, "at '/rayAutoscaling/enabled'"),
        ({"layuot": "1gpu"}, "additional properties 'layuot' not allowed"),
        (
            {"auth": {"tenantsSecret": {"name": "t", "subPath": "tenants.yaml"}}},
            "additional properties 'subPath' not allowed",
        ),
        ({"auth": {"tenantsSecret": {"name": "t", "key": "a/b"}}}, "at '/auth/tenantsSecret/key'"),
    ],
)
def test_bad_values_fail_with_the_schemas_message(chart, values, message):
    with pytest.raises(helm.HelmValuesError) as failure:
        chart.render(values, name="prod", namespace="llm")
    assert message in str(failure.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"layout": "4gpu-tp", "workers": {"gpusPerWorker": 2}},
            "tensor-parallel group of 4 GPUs, which must sit in one pod",
        ),
        ({"layout": "2gpu-dp", "workers": {"gpusPerWorker": 1, "replicas": 1}}, "needs 2 GPUs: 2 workers"),
        ({"workers": {"replicas": 2, "maxReplicas": 1}}, "workers.maxReplicas (1) is below"),
        ({"model": {"source": "/models/m"}}, "set model.cache.persistentVolumeClaim"),
        (
            {"model": {"source": "/data/m", "cache": {"persistentVolumeClaim": "models"}}},
            "not on the model cache volume, mounted at /models",
        ),
    ],
)
def test_values_that_cannot_place_the_layout_fail_rendering(chart, values, message):
    with pytest.raises(helm.HelmRenderError) as failure:
        chart.render(values, name="prod", namespace="llm")
    assert message in str(failure.value)


def test_without_api_keys_the_chart_renders_only_when_told_to_serve_the_api_open(chart):
    # The defaults: no keys, not open.
    with pytest.raises(helm.HelmRenderError) as failure:
        chart.render({}, name="prod", namespace="llm")
    message = str(failure.value)
    assert "no API keys: every Ray pod serves the API on 0.0.0.0:8000" in message
    assert "Set apiKeys.secretName" in message and "or auth.allowAnonymous: true" in message
    assert "auth.tenantsSecret.name" in message
    # Open on purpose: the Serve config is told too, so the service itself knows.
    (application,) = serve_config(
        one(render(chart, {"auth": {"allowAnonymous": True}}, keys=False), "RayService")
    )["applications"]
    assert application["args"]["auth"] == {"allow_anonymous": True}
    # Keys in the Serve config itself count as keys.
    values = {"serveConfig": {"applicationArgs": {"auth": {"api_keys": ["sk-1"]}}}}
    (application,) = serve_config(one(render(chart, values, keys=False), "RayService"))["applications"]
    assert application["args"]["auth"] == {"api_keys": ["sk-1"]}
    # One name for "open": the Serve config's own flag alone is refused, naming the value to set.
    with pytest.raises(helm.HelmRenderError, match=r"set auth\.allowAnonymous: true instead"):
        chart.render(
            {"serveConfig": {"applicationArgs": {"auth": {"allow_anonymous": True}}}},
            name="prod",
            namespace="llm",
        )


TENANTS = {"auth": {"tenantsSecret": {"name": "ministral-tenants", "key": "tenants-v2.yaml"}}}
TENANTS_DIR = "/etc/ministral/tenants"


def test_a_tenants_secret_is_mounted_in_every_ray_container_and_named_in_the_serve_config(chart):
    values = {
        **TENANTS,
        "layout": "4gpu-dp",
        "workers": {"gpusPerWorker": 1},
        "serveConfig": {"applicationArgs": {"auth": {"api_keys": ["sk-1"], "tenants_reload_s": 5}}},
    }
    objects = render(chart, values)
    for manifest in objects:
        validate(manifest)
    rayservice = one(objects, "RayService")
    for pod in kuberay_pods(rayservice):
        validate(pod)
    # The application builder sees the file (it deploys the quota ledger for it); the given auth stays.
    (application,) = serve_config(rayservice)["applications"]
    assert application["args"]["auth"] == {
        "api_keys": ["sk-1"],
        "tenants_reload_s": 5,
        "tenants_file": f"{TENANTS_DIR}/tenants.yaml",
    }
    assert AppConfig.model_validate(application["args"]).auth.tenants_file == f"{TENANTS_DIR}/tenants.yaml"
    for group in groups(rayservice):
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        # The whole volume, read-only: a subPath mount would never see the Secret change.
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "tenants"]
        assert mount == {"name": "tenants", "mountPath": TENANTS_DIR, "readOnly": True}
        (volume,) = [v for v in pod["volumes"] if v["name"] == "tenants"]
        assert volume["secret"] == {
            "secretName": "ministral-tenants",
            "items": [{"key": "tenants-v2.yaml", "path": "tenants.yaml"}],
            # Root's and the pod's fsGroup's (100), which the Ray user (1000:100) is in.
            "defaultMode": 0o440,
        }
        assert pod["securityContext"]["fsGroup"] == 100
        # The Secret's path wins nowhere else: the environment does not name another file.
        assert "MINISTRAL_TENANTS_FILE" not in {e["name"] for e in container["env"]}
    # The workers' init container, which copies the mounts, sees the volume too.
    _, worker = kuberay_pods(rayservice)
    (init,) = worker["spec"]["initContainers"]
    assert {"name": "tenants", "mountPath": TENANTS_DIR, "readOnly": True} in init["volumeMounts"]
    # Without an fsGroup the file is root's alone: then readable by all, so the Ray user reads it.
    loosened = one(render(chart, {**TENANTS, "securityContext": {"fsGroup": None}}), "RayService")
    for group in groups(loosened):
        (volume,) = [v for v in group["template"]["spec"]["volumes"] if v["name"] == "tenants"]
        assert volume["secret"]["defaultMode"] == 0o444


def test_without_a_tenants_secret_nothing_is_mounted_and_the_serve_config_names_no_file(chart):
    rayservice = one(render(chart), "RayService")
    (application,) = serve_config(rayservice)["applications"]
    assert "tenants_file" not in application["args"].get("auth", {})
    for group in groups(rayservice):
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        assert "tenants" not in {v["name"] for v in pod["volumes"]}
        assert TENANTS_DIR not in {m["mountPath"] for m in container["volumeMounts"]}
        assert "tenants" not in {m["name"] for m in container["volumeMounts"]}


def test_a_tenants_secret_counts_as_api_keys(chart):
    rayservice = one(
        render(chart, {"auth": {"tenantsSecret": {"name": "ministral-tenants"}}}, keys=False), "RayService"
    )
    validate(rayservice)
    (application,) = serve_config(rayservice)["applications"]
    assert application["args"]["auth"] == {"tenants_file": f"{TENANTS_DIR}/tenants.yaml"}
    (volume,) = [v for v in groups(rayservice)[0]["template"]["spec"]["volumes"] if v["name"] == "tenants"]
    assert volume["secret"]["items"] == [{"key": "tenants.yaml", "path": "tenants.yaml"}]
    env = {e["name"] for e in groups(rayservice)[0]["template"]["spec"]["containers"][0]["env"]}
    assert "MINISTRAL_API_KEYS" not in env


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {**TENANTS, "serveConfig": {"applicationArgs": {"auth": {"tenants_file": "/models/t.yaml"}}}},
            "serveConfig.applicationArgs.auth.tenants_file: auth.tenantsSecret mounts the tenants file",
        ),
        (
            {**TENANTS, "extraEnv": [{"name": "MINISTRAL_TENANTS_FILE", "value": "/tmp/t.yaml"}]},
            "extraEnv sets MINISTRAL_TENANTS_FILE, which would replace the tenants file",
        ),
    ],
)
def test_a_second_tenants_file_beside_the_secret_fails_rendering(chart, values, message):
    with pytest.raises(helm.HelmRenderError) as failure:
        render(chart, values)
    assert message in str(failure.value)


def test_overrides_are_merged_into_the_generated_config(chart):
    values = {
        "layout": "2gpu-dp",
        "model": {"source": "/models/ministral", "cache": {"persistentVolumeClaim": "model-cache"}},
        "serveConfig": {
            "applicationArgs": {"engine": {"max_model_len": 16384}, "encoder": {"cache_bytes": 2**30}}
        },
        "apiKeys": {"secretName": "ministral-keys"},
    }
    rayservice = one(render(chart, values), "RayService")
    validate(rayservice)
    (application,) = serve_config(rayservice)["applications"]
    generated = yaml.safe_load((ROOT / "serve" / "configs" / "2gpu-dp.yaml").read_text())["applications"][0]
    expected = json.loads(json.dumps(generated["args"]))
    expected["engine"]["max_model_len"] = 16384
    expected["encoder"] = {"cache_bytes": 2**30}
    expected["model"]["source"] = "/models/ministral"
    assert application["args"] == expected
    assert AppConfig.model_validate(application["args"]).encoder.cache_bytes == 2**30

    for group in (rayservice["spec"]["rayClusterConfig"]["headGroupSpec"], workers(rayservice)):
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["HF_HOME"]["value"] == "/models/huggingface"
        assert env["MINISTRAL_API_KEYS"]["valueFrom"]["secretKeyRef"] == {
            "name": "ministral-keys",
            "key": "api-keys",
        }
        assert "HF_TOKEN" not in env
        assert {"name": "model-cache", "mountPath": "/models"} in container["volumeMounts"]
        assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "model-cache"}} in pod[
            "volumes"
        ]
        assert pod["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("toggle", ["podMonitor", "prometheusRule", "dashboards"])
def test_each_monitoring_toggle_adds_only_its_objects(chart, toggle):
    kinds = {"podMonitor": {"PodMonitor"}, "prometheusRule": {"PrometheusRule"}, "dashboards": {"ConfigMap"}}
    objects = render(chart, {"monitoring": {toggle: {"enabled": True}}})
    for manifest in objects:
        validate(manifest)
    assert {o["kind"] for o in objects} == BASE_KINDS | kinds[toggle]
    assert len([o for o in objects if o["kind"] == "ConfigMap"]) == 1 + 3 * (toggle == "dashboards")


def test_the_pod_monitor_selects_every_ray_pod_on_its_metrics_port(chart):
    objects = render(chart, ALL_MONITORING)
    selector = one(objects, "PodMonitor")["spec"]["selector"]["matchLabels"]
    (endpoint,) = one(objects, "PodMonitor")["spec"]["podMetricsEndpoints"]
    cluster = one(objects, "RayService")["spec"]["rayClusterConfig"]
    for group in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"]):
        assert group["rayStartParams"]["metrics-export-port"] == "8080"
        assert selector.items() <= group["template"]["metadata"]["labels"].items()
        (container,) = group["template"]["spec"]["containers"]
        assert {"name": endpoint["port"], "containerPort": 8080} in container["ports"]


def test_alert_rules_and_dashboards_are_the_files_of_dashboards(chart):
    objects = render(chart, ALL_MONITORING)
    rules = one(objects, "PrometheusRule")["spec"]
    assert rules == yaml.safe_load((ROOT / "dashboards" / "alerts.yaml").read_text())
    dashboards = {
        name: text
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["labels"].get("grafana_dashboard") == "1"
        for name, text in o["data"].items()
    }
    files = {path.name: path.read_text() for path in (ROOT / "dashboards").glob("*.json")}
    assert len(files) >= 3
    assert dashboards == files


def test_the_schema_the_image_and_the_chart_match_the_project():
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["properties"]["layout"]["enum"] == list(LAYOUTS)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["rayVersion"] == ray.__version__
    chart_yaml = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart_yaml["appVersion"] == project["version"]
    assert f"ARG RAY_IMAGE=rayproject/ray:{ray.__version__}-py311-gpu\n" in (ROOT / "Dockerfile").read_text()


def test_the_validators_refuse_what_a_cluster_would(chart):
    objects = render(chart, ALL_MONITORING)
    rayservice = one(objects, "RayService")
    workers(rayservice)["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        validate(rayservice)
    monitor = one(objects, "PodMonitor")
    monitor["spec"]["podMetricsEndpoints"][0]["interval"] = "often"
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor)
    dashboard = one([o for o in objects if o["metadata"]["name"].endswith("overview")], "ConfigMap")
    dashboard["data"]["overview.json"] = {"not": "a string"}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(dashboard)


def test_a_packaged_chart_carries_the_files_its_symlinks_point_at(tmp_path):
    # Operators install from an archive: `helm package` must resolve files/ into it.
    archive = Path(helm.package(CHART, destination=tmp_path))
    packaged = helm.Chart.load_archive(archive.read_bytes())
    names = {entry["name"] for entry in packaged.files}
    assert "files/serve-configs/cluster-needs.json" in names
    assert "files/serve-configs/front-door.json" in names
    assert "files/dashboards/overview.json" in names
    assert not any(name.endswith(".py") for name in names)
    assert render(packaged, {"layout": "4gpu-dp", **ALL_MONITORING}) == render(
        helm.Chart.load(CHART), {"layout": "4gpu-dp", **ALL_MONITORING}
    )


def test_monitoring_labels_reach_every_monitoring_object(chart):
    # kube-prometheus-stack's Prometheus picks monitors and rules by its `release` label.
    values = {
        "monitoring": {
            "labels": {"release": "kube-prometheus-stack", "team": "llm"},
            "podMonitor": {"enabled": True, "labels": {"team": "serving"}},
            "prometheusRule": {"enabled": True},
            "dashboards": {"enabled": True},
        }
    }
    objects = render(chart, values)
    monitoring = [o for o in objects if o["kind"] in {"PodMonitor", "PrometheusRule"}]
    monitoring += [o for o in objects if o["kind"] == "ConfigMap" and "-dashboard-" in o["metadata"]["name"]]
    assert len(monitoring) == 5
    for manifest in monitoring:
        validate(manifest)
        assert manifest["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    # An object's own labels win over the common ones.
    assert one(objects, "PodMonitor")["metadata"]["labels"]["team"] == "serving"
    assert one(objects, "PrometheusRule")["metadata"]["labels"]["team"] == "llm"
    # The Ray pods do not carry them.
    for group in groups(one(objects, "RayService")):
        assert "release" not in group["template"]["metadata"]["labels"]
