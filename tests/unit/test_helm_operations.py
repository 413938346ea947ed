"""What an operator sets to run the chart in production: upgrades, GCS fault tolerance, disruption
budgets, the NetworkPolicy, Ingress and HTTPRoute, identity, scheduling, image and storage.

Every object is validated as in test_helm_chart.py: built-in kinds against Kubernetes' schemas,
the RayService against KubeRay's CRD, the HTTPRoute against Gateway API's.
"""

from __future__ import annotations

import helm_python as helm
import pytest

from tests.unit.test_helm_chart import (
    CHART,
    groups,
    kuberay_pods,
    one,
    render,
    validate,
)


@pytest.fixture(scope="module")
def chart() -> helm.Chart:
    return helm.Chart.load(CHART)


DIGEST = "sha256:" + "5" * 64


def by_name(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def selects(selector: dict, pod: dict) -> bool:
    """Whether a LabelSelector of matchLabels selects `pod`."""
    assert set(selector) == {"matchLabels"}
    return selector["matchLabels"].items() <= pod["metadata"]["labels"].items()


def render_error(chart, values: dict) -> str:
    with pytest.raises(helm.HelmRenderError) as failure:
        render(chart, values)
    return str(failure.value)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({}, {"type": "NewCluster"}),
        ({"upgradeStrategy": {"type": "None"}}, {"type": "None"}),
        (
            {
                "rayAutoscaling": {"enabled": True},
                "upgradeStrategy": {
                    "type": "NewClusterWithIncrementalUpgrade",
                    "clusterUpgradeOptions": {"gatewayClassName": "istio", "stepSizePercent": 10},
                },
            },
            {
                "type": "NewClusterWithIncrementalUpgrade",
                "clusterUpgradeOptions": {
                    "gatewayClassName": "istio",
                    "stepSizePercent": 10,
                    "intervalSeconds": 60,
                    "maxSurgePercent": 25,
                },
            },
        ),
    ],
)
def test_each_upgrade_strategy_renders_as_kuberay_reads_it(chart, values, expected):
    rayservice = one(render(chart, values), "RayService")
    validate(rayservice)
    assert rayservice["spec"]["upgradeStrategy"] == expected


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"upgradeStrategy": {"type": "NewClusterWithIncrementalUpgrade"}},
            "grows the new cluster through Ray's autoscaler: set rayAutoscaling.enabled: true",
        ),
        (
            {
                "rayAutoscaling": {"enabled": True},
                "upgradeStrategy": {"type": "NewClusterWithIncrementalUpgrade"},
            },
            "set upgradeStrategy.clusterUpgradeOptions.gatewayClassName",
        ),
        (
            {
                "rayAutoscaling": {"enabled": True},
                "upgradeStrategy": {
                    "type": "NewClusterWithIncrementalUpgrade",
                    "clusterUpgradeOptions": {"gatewayClassName": "istio", "stepSizePercent": 50},
                },
            },
            "stepSizePercent (50) is above maxSurgePercent (25)",
        ),
        ({"gcsFaultTolerance": {"enabled": True}}, "set gcsFaultTolerance.redisAddress"),
        (
            {"model": {"cache": {"create": True, "persistentVolumeClaim": "models"}}},
            "model.cache.create makes the claim, and model.cache.persistentVolumeClaim (models)",
        ),
        ({"httpRoute": {"enabled": True}}, "set httpRoute.parentRefs"),
    ],
)
def test_settings_kuberay_or_kubernetes_would_refuse_fail_rendering(chart, values, message):
    assert message in render_error(chart, values)


def test_the_schema_refuses_an_unknown_upgrade_strategy(chart):
    with pytest.raises(helm.HelmValuesError, match="at '/upgradeStrategy/type': value must be one of"):
        render(chart, {"upgradeStrategy": {"type": "RollingUpdate"}})


def test_gcs_fault_tolerance_points_kuberay_at_redis_and_frees_the_heads_drain(chart):
    values = {
        "gcsFaultTolerance": {
            "enabled": True,
            "redisAddress": "redis.llm.svc:6379",
            "redisPassword": {"secretName": "redis-password"},
        }
    }
    objects = render(chart, values)
    rayservice = one(objects, "RayService")
    validate(rayservice)
    assert rayservice["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"] == {
        "redisAddress": "redis.llm.svc:6379",
        "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "redis-password", "key": "password"}}},
    }
    # KubeRay refuses a Redis password or address set beside it.
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert "redis-password" not in head["rayStartParams"]
    assert not {"REDIS_PASSWORD", "RAY_REDIS_ADDRESS"} & {
        e["name"] for e in head["template"]["spec"]["containers"][0]["env"]
    }
    assert by_name(objects, "PodDisruptionBudget")["prod-ministral-serve-head"]["spec"]["maxUnavailable"] == 1
    assert "gcsFaultToleranceOptions" not in one(render(chart), "RayService")["spec"]["rayClusterConfig"]


def test_disruption_budgets_cover_head_and_workers_apart(chart):
    objects = render(chart, {"layout": "4gpu-dp", "workers": {"gpusPerWorker": 1}})
    budgets = by_name(objects, "PodDisruptionBudget")
    for budget in budgets.values():
        validate(budget)
    head_pod, worker_pod = kuberay_pods(one(objects, "RayService"))
    head, workers_budget = budgets["prod-ministral-serve-head"], budgets["prod-ministral-serve-workers"]
    assert selects(head["spec"]["selector"], head_pod) and not selects(head["spec"]["selector"], worker_pod)
    assert selects(workers_budget["spec"]["selector"], worker_pod)
    assert not selects(workers_budget["spec"]["selector"], head_pod)
    # Without GCS fault tolerance a new head restarts every worker: no voluntary eviction.
    assert head["spec"]["maxUnavailable"] == 0
    assert workers_budget["spec"]["maxUnavailable"] == 1
    # Another release's pods are not counted.
    other = dict(
        head_pod,
        metadata={
            **head_pod["metadata"],
            "labels": {**head_pod["metadata"]["labels"], "app.kubernetes.io/instance": "other"},
        },
    )
    assert not selects(head["spec"]["selector"], other)
    assert "PodDisruptionBudget" not in {
        o["kind"] for o in render(chart, {"podDisruptionBudget": {"enabled": False}})
    }


def test_the_network_policy_lets_in_the_release_the_api_metrics_and_the_operator(chart):
    values = {
        "networkPolicy": {"apiFrom": [{"namespaceSelector": {"matchLabels": {"name": "ingress-nginx"}}}]}
    }
    objects = render(chart, values)
    policy = one(objects, "NetworkPolicy")
    validate(policy)
    for pod in kuberay_pods(one(objects, "RayService")):
        assert selects(policy["spec"]["podSelector"], pod)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = policy["spec"]["ingress"]
    # The release's own pods: every port (Ray's GCS, raylets, object transfer, workers).
    (own,) = [r for r in rules if "ports" not in r]
    (peer,) = own["from"]
    assert peer["podSelector"] == policy["spec"]["podSelector"] and "namespaceSelector" not in peer
    by_port = {r["ports"][0]["port"]: r for r in rules if "ports" in r}
    assert set(by_port) == {8000, 8080, 8265}
    assert by_port[8000]["from"] == values["networkPolicy"]["apiFrom"]
    assert by_port[8080]["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    assert by_port[8265]["from"][0]["podSelector"] == {
        "matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}
    }
    # Without apiFrom, the API port is open to every source (keys guard it); nothing else is.
    rules = one(render(chart), "NetworkPolicy")["spec"]["ingress"]
    assert [r for r in rules if "from" not in r] == [{"ports": [{"port": 8000, "protocol": "TCP"}]}]
    assert "NetworkPolicy" not in {o["kind"] for o in render(chart, {"networkPolicy": {"enabled": False}})}


def test_ingress_and_http_route_reach_kuberays_serve_service_with_streaming_timeouts(chart):
    values = {
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "hosts": [{"host": "llm.example.com"}],
            "tls": [{"secretName": "llm-tls", "hosts": ["llm.example.com"]}],
        },
        "httpRoute": {
            "enabled": True,
            "parentRefs": [{"name": "shared", "namespace": "gateway-system"}],
            "hostnames": ["llm.example.com"],
        },
    }
    objects = render(chart, values)
    ingress, route = one(objects, "Ingress"), one(objects, "HTTPRoute")
    validate(ingress)
    validate(route)
    # KubeRay names the Service that follows the serving cluster <RayService>-serve-svc.
    service = one(objects, "RayService")["metadata"]["name"] + "-serve-svc"
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "llm.example.com"
    assert rule["http"]["paths"][0]["backend"] == {"service": {"name": service, "port": {"number": 8000}}}
    assert (
        ingress["spec"]["ingressClassName"] == "nginx"
        and ingress["spec"]["tls"][0]["secretName"] == "llm-tls"
    )
    assert int(ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 600
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    (route_rule,) = route["spec"]["rules"]
    assert route_rule["backendRefs"] == [{"name": service, "port": 8000}]
    assert route_rule["timeouts"] == {"request": "3600s", "backendRequest": "3600s"}
    assert route["spec"]["parentRefs"] == values["httpRoute"]["parentRefs"]
    assert route["spec"]["hostnames"] == ["llm.example.com"]
    # An Ingress without hosts sends everything to the Service.
    bare = one(render(chart, {"ingress": {"enabled": True}}), "Ingress")
    validate(bare)
    assert bare["spec"]["defaultBackend"] == {"service": {"name": service, "port": {"number": 8000}}}


def test_the_validators_refuse_a_bad_http_route(chart):
    route = one(
        render(chart, {"httpRoute": {"enabled": True, "parentRefs": [{"name": "shared"}]}}), "HTTPRoute"
    )
    route["spec"]["rules"][0]["timeouts"]["request"] = "an hour"
    with pytest.raises(Exception, match="an hour"):
        validate(route)


def test_identity_and_scheduling_pass_through_to_every_pod(chart):
    values = {
        "runtimeClassName": "nvidia",
        "priorityClassName": "inference-critical",
        "serviceAccount": {"create": False, "name": "llm-runner"},
    }
    objects = render(chart, values)
    assert "ServiceAccount" not in {o["kind"] for o in objects}
    for group in groups(one(objects, "RayService")):
        spec = group["template"]["spec"]
        assert spec["runtimeClassName"] == "nvidia"
        assert spec["priorityClassName"] == "inference-critical"
        assert spec["serviceAccountName"] == "llm-runner"
        assert spec["automountServiceAccountToken"] is False
    for group in groups(one(render(chart), "RayService")):
        assert {"runtimeClassName", "priorityClassName"}.isdisjoint(group["template"]["spec"])
    # Made by the chart, named after the release unless named.
    objects = render(chart, {"serviceAccount": {"annotations": {"iam.example.com/role": "llm"}}})
    account = one(objects, "ServiceAccount")
    validate(account)
    assert account["metadata"]["name"] == "prod-ministral-serve"
    assert account["metadata"]["annotations"] == {"iam.example.com/role": "llm"}


@pytest.mark.parametrize(
    ("image", "expected", "policy"),
    [
        ({}, "ministral-serve:0.1.0", "Always"),
        (
            {"repository": "registry.example.com/ms", "tag": "0.1.0", "digest": DIGEST},
            f"registry.example.com/ms@{DIGEST}",
            "IfNotPresent",
        ),
        ({"digest": DIGEST, "pullPolicy": "Always"}, f"ministral-serve@{DIGEST}", "Always"),
    ],
)
def test_a_digest_pins_the_image_and_a_tag_alone_is_pulled_every_time(chart, image, expected, policy):
    for group in groups(one(render(chart, {"image": image}), "RayService")):
        (container,) = group["template"]["spec"]["containers"]
        assert (container["image"], container["imagePullPolicy"]) == (expected, policy)


def test_the_schema_refuses_a_digest_that_is_not_one(chart):
    with pytest.raises(helm.HelmValuesError, match="at '/image/digest'"):
        render(chart, {"image": {"digest": "latest"}})


def test_every_pod_asks_for_ephemeral_storage(chart):
    for group in groups(one(render(chart), "RayService")):
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["requests"]["ephemeral-storage"].endswith("Gi")


def test_the_chart_can_make_the_model_cache_claim(chart):
    values = {
        "model": {
            "source": "/models/Ministral-3-3B-Instruct-2512",
            "cache": {
                "create": True,
                "size": "80Gi",
                "storageClassName": "nfs",
                "accessModes": ["ReadWriteMany"],
            },
        }
    }
    objects = render(chart, values)
    claim = one(objects, "PersistentVolumeClaim")
    validate(claim)
    assert claim["metadata"]["name"] == "prod-ministral-serve-models"
    assert claim["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert claim["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "storageClassName": "nfs",
        "resources": {"requests": {"storage": "80Gi"}},
    }
    for group in groups(one(objects, "RayService")):
        spec = group["template"]["spec"]
        assert {
            "name": "model-cache",
            "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]},
        } in spec["volumes"]
        (container,) = spec["containers"]
        assert {"name": "model-cache", "mountPath": "/models"} in container["volumeMounts"]
        assert {"name": "HF_HOME", "value": "/models/huggingface"} in container["env"]
    # The cluster's default StorageClass when none is named.
    claim = one(render(chart, {"model": {"cache": {"create": True}}}), "PersistentVolumeClaim")
    assert "storageClassName" not in claim["spec"]
    assert "PersistentVolumeClaim" not in {o["kind"] for o in render(chart)}


def test_every_object_is_in_the_release_namespace_and_labelled(chart):
    values = {
        "model": {"cache": {"create": True}},
        "ingress": {"enabled": True},
        "httpRoute": {"enabled": True, "parentRefs": [{"name": "shared"}]},
        "monitoring": {
            "podMonitor": {"enabled": True},
            "prometheusRule": {"enabled": True},
            "dashboards": {"enabled": True},
        },
    }
    for manifest in render(chart, values):
        assert manifest["metadata"]["namespace"] == "llm", manifest["kind"]
        assert manifest["metadata"]["labels"]["app.kubernetes.io/instance"] == "prod", manifest["kind"]
