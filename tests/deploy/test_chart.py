"""The Helm chart lints, renders valid Kubernetes 1.29 manifests for every supported shape, and keeps secrets out.

Method: no cluster and no helm binary — ``helm-python-sdk`` (Helm's Go SDK) lints the chart strictly and
renders it with its defaults and with edge-case values, enforcing ``values.schema.json``; every rendered
manifest is validated strictly by ``kubernetes-validate`` against Kubernetes 1.29 and the newest schema
it ships (the Prometheus Operator kinds, which it does not know, against the closed schemas in
``tests/deploy/prometheus_operator.py``); the settings files the ConfigMap carries are loaded by
metergate's own ``load_settings``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as kv

from metergate.config.settings import load_settings
from tests.deploy import prometheus_operator

CHART = Path(__file__).resolve().parents[2] / "charts" / "metergate"
KUBE_VERSIONS = ["1.29.0", kv.latest_version()]
RELEASE, NAMESPACE = "billing", "payments"

EXISTING_SECRETS: dict[str, Any] = {
    "routes": [{"prefix": "/openai", "upstream": "https://api.openai.com",
                "apiKeySecret": {"name": "openai", "key": "api-key"}},
               {"prefix": "/vllm", "upstream": "http://vllm.models:8000", "providerId": "vllm"}],
    "database": {"url": "", "existingSecret": {"name": "metergate-db", "key": "url"}},
    "redis": {"url": "", "existingSecret": {"name": "metergate-redis", "key": "url"}},
    "adminKeys": {"existingSecret": "metergate-admin", "keys": ["live", "test"]},
    "portalSecrets": {"existingSecret": "metergate-portal", "keys": [{"id": "k2026", "key": "k2026"},
                                                                    {"id": "k2025", "key": "k2025"}]},
    "publicUrl": "https://billing.example.com",
    "secretSettings": [{"setting": "notify_secret", "secret": {"name": "metergate-notify", "key": "hmac"}},
                       {"setting": "portal_brand_name", "roles": ["sidecar", "control"],
                        "secret": {"name": "branding", "key": "name"}}],
}
EDGE_CASES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "gateway": {"gateway": {"enabled": True, "replicaCount": 3}},
    "example-app": {"exampleApp": {"enabled": True}},
    "existing-secrets": EXISTING_SECRETS,
    "sqlite-everything-on": {"gateway": {"enabled": True}, "exampleApp": {"enabled": True},
                             "database": {"url": "", "existingSecret": {"name": "", "key": "url"}}},
    "postgres-url-without-secret": {"database": {"url": "postgresql://metergate@postgres:5432/metergate",
                                                 "existingSecret": {"name": "", "key": "url"}},
                                    "redis": {"url": "redis://redis:6379/0",
                                              "existingSecret": {"name": "", "key": "u"}}},
    "resources-overridden": {
        "control": {"resources": {"requests": {"cpu": "2", "memory": "1Gi"}, "limits": {"cpu": "4", "memory": "2Gi"}}},
        "sidecar": {"resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "96Mi"}}},
        "gateway": {"enabled": True, "resources": {"limits": {"memory": "3Gi"}}},
        "exampleApp": {"enabled": True}},
    "gateway-only": {"control": {"enabled": False}, "gateway": {"enabled": True, "preStopSleepSeconds": 0}},
    "no-routes-extra-settings": {"routes": [], "settings": {"hold_ttl_s": 1200, "sweep_interval_s": 10}},
    "observability-everything-on": {
        "gateway": {"enabled": True, "autoscaling": {"enabled": True, "targetMemoryUtilizationPercentage": 80}},
        "control": {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 2}},
        "podDisruptionBudget": {"enabled": True},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
                    "prometheusRule": {"enabled": True, "selector": 'job=~"billing-metergate-.*"'},
                    "dashboard": {"enabled": True, "annotations": {"grafana_folder": "Billing"}}}},
    "budget-as-percentage-memory-only-autoscaler": {
        "podDisruptionBudget": {"enabled": True, "minAvailable": "50%", "maxUnavailable": None},
        "control": {"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": None,
                                    "targetMemoryUtilizationPercentage": 75}}},
}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm_python.Chart]:
    loaded = helm_python.Chart.load(CHART)
    yield loaded
    loaded.close()


def render(chart: helm_python.Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    """Every Kubernetes object the chart renders with ``values`` (NOTES.txt aside)."""
    rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    return [doc for path, text in sorted(rendered.items()) if not path.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text) if doc]


def find(objects: list[dict[str, Any]], kind: str, suffix: str) -> dict[str, Any]:
    [found] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(suffix)]
    return found


def pod_spec(objects: list[dict[str, Any]], suffix: str) -> dict[str, Any]:
    spec: dict[str, Any] = find(objects, "Deployment", suffix)["spec"]["template"]["spec"]
    return spec


def test_chart_lints_strictly_for_kubernetes_1_29() -> None:
    report = helm_python.lint(CHART, strict=True, kube_version="1.29.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []  # only "icon is recommended" (info)


@pytest.mark.parametrize("case", EDGE_CASES)
def test_every_rendered_manifest_is_valid_kubernetes(chart: helm_python.Chart, case: str) -> None:
    objects = render(chart, EDGE_CASES[case])
    assert objects
    for obj in objects:
        if prometheus_operator.is_operator_kind(obj):
            prometheus_operator.validate(obj)
            continue
        for version in KUBE_VERSIONS:
            # Raises ValidationError on an unknown field or a wrong type; SchemaNotFoundError on an unknown kind.
            kv.validate(obj, version, strict=True)


def test_defaults_render_a_control_plane_and_its_test_hook(chart: helm_python.Chart) -> None:
    objects = render(chart, {})
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objects)
    assert kinds == [("ConfigMap", "billing-metergate-config"), ("Deployment", "billing-metergate-control"),
                     ("Pod", "billing-metergate-test-readyz"), ("Service", "billing-metergate-control"),
                     ("ServiceAccount", "billing-metergate")]
    [container] = pod_spec(objects, "-control")["containers"]
    assert container["args"][container["args"].index("--role") + 1] == "control"
    test_pod = find(objects, "Pod", "-test-readyz")
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert "http://billing-metergate-control:8080/readyz" in test_pod["spec"]["containers"][0]["command"][-1]


def test_sidecar_is_a_native_sidecar_that_gates_the_app(chart: helm_python.Chart) -> None:
    objects = render(chart, {"exampleApp": {"enabled": True}})
    spec = pod_spec(objects, "-example-app")
    [sidecar] = spec["initContainers"]
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/livez", "port": "metergate"}
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert sidecar["args"][sidecar["args"].index("--role") + 1] == "sidecar"
    assert sidecar["resources"]["limits"]["memory"]
    security = sidecar["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert {m["name"] for m in sidecar["volumeMounts"]} <= {v["name"] for v in spec["volumes"]}
    [app] = spec["containers"]
    assert {"name": "OPENAI_BASE_URL", "value": "http://127.0.0.1:8080/openai/v1"} in app["env"]
    assert spec["terminationGracePeriodSeconds"] > 25  # longer than the drain deadline
    # The validator has teeth: before the field existed (1.28 added it, alpha and off by default; 1.29 turned
    # it on), a restartPolicy on an init container is an unknown field.
    with pytest.raises(kv.ValidationError, match="restartPolicy"):
        kv.validate(find(objects, "Deployment", "-example-app"), "1.27.0", strict=True)


def test_gateway_is_a_deployment_of_proxies_behind_a_service(chart: helm_python.Chart) -> None:
    objects = render(chart, {"gateway": {"enabled": True, "replicaCount": 3}})
    deployment = find(objects, "Deployment", "-gateway")
    assert deployment["spec"]["replicas"] == 3
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["args"][container["args"].index("--role") + 1] == "sidecar"
    assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "python"
    service = find(objects, "Service", "-gateway")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    only = render(chart, {"control": {"enabled": False}, "gateway": {"enabled": True}})
    assert "-gateway:8080/readyz" in find(only, "Pod", "-test-readyz")["spec"]["containers"][0]["command"][-1]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def test_secrets_are_referenced_never_inlined_and_each_role_gets_only_its_own(chart: helm_python.Chart) -> None:
    objects = render(chart, {**EXISTING_SECRETS, "exampleApp": {"enabled": True}})
    config = find(objects, "ConfigMap", "-config")["data"]
    control_env = env_of(pod_spec(objects, "-control")["containers"][0])
    sidecar_env = env_of(pod_spec(objects, "-example-app")["initContainers"][0])
    refs = {name: e["valueFrom"]["secretKeyRef"] for name, e in {**control_env, **sidecar_env}.items()}
    assert refs["METERGATE_DATABASE_URL"] == {"name": "metergate-db", "key": "url"}
    assert refs["METERGATE_REDIS_URL"] == {"name": "metergate-redis", "key": "url"}
    assert refs["MG_ROUTE_0_API_KEY"] == {"name": "openai", "key": "api-key"}
    assert refs["MG_ADMIN_KEY_1"] == {"name": "metergate-admin", "key": "test"}
    assert refs["MG_PORTAL_SECRET_0"] == {"name": "metergate-portal", "key": "k2026"}
    # Least privilege: the proxy never holds an admin key, the control plane never a provider key.
    assert not [name for name in sidecar_env if name.startswith("MG_ADMIN_KEY")]
    assert not [name for name in control_env if name.startswith("MG_ROUTE")]
    sidecar = yaml.safe_load(config["sidecar.yaml"])
    control = yaml.safe_load(config["control.yaml"])
    assert sidecar["routes"][0]["api_key"] == "${MG_ROUTE_0_API_KEY}"
    assert "api_key" not in sidecar["routes"][1]
    assert control["admin_keys"] == ["${MG_ADMIN_KEY_0}", "${MG_ADMIN_KEY_1}"]
    assert list(control["portal_secrets"]) == ["k2026", "k2025"]  # the first signs: order is kept
    assert "database_url" not in sidecar and "admin_keys" not in sidecar and "routes" not in control
    assert control["notify_secret"] == "${MG_SETTING_0}" and "notify_secret" not in sidecar  # control by default
    assert sidecar["portal_brand_name"] == control["portal_brand_name"] == "${MG_SETTING_1}"
    assert refs["MG_SETTING_0"] == {"name": "metergate-notify", "key": "hmac"}
    assert "MG_SETTING_0" not in sidecar_env and "MG_SETTING_1" in sidecar_env


@pytest.mark.parametrize("case", ["defaults", "existing-secrets", "no-routes-extra-settings"])
def test_configmap_settings_load_in_metergate(chart: helm_python.Chart, case: str, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    config = find(render(chart, EDGE_CASES[case]), "ConfigMap", "-config")["data"]
    # What the Secrets would hand the containers, shaped as metergate requires.
    for name, value in {"MG_ROUTE_0_API_KEY": "sk-" + "p" * 30, "MG_ADMIN_KEY_0": "mg_live_" + "a" * 24,
                        "MG_ADMIN_KEY_1": "mg_test_" + "b" * 24, "MG_PORTAL_SECRET_0": "s" * 40,
                        "MG_PORTAL_SECRET_1": "t" * 40, "MG_SETTING_0": "n" * 32, "MG_SETTING_1": "Acme"}.items():
        monkeypatch.setenv(name, value)
    for role in ("sidecar", "control"):
        path = tmp_path / f"{role}.yaml"
        path.write_text(config[f"{role}.yaml"])
        settings = load_settings(path, role=role)
        assert (settings.host, settings.port, settings.role) == ("0.0.0.0", 8080, role)
        if role == "sidecar" and case == "existing-secrets":
            assert settings.routes[0].api_key is not None
            assert settings.routes[0].api_key.get_secret_value() == "sk-" + "p" * 30
        if role == "control" and case == "existing-secrets":
            assert len(settings.admin_keys) == 2 and list(settings.portal_secrets) == ["k2026", "k2025"]


@pytest.mark.parametrize("values, complaint", [
    # Numbers out of range or of the wrong type.
    ({"control": {"replicaCount": -1}}, "/control/replicaCount"),
    ({"gateway": {"replicaCount": "three"}}, "/gateway/replicaCount"),
    ({"port": 70000}, "/port"),
    ({"drainDeadlineSeconds": "30s"}, "/drainDeadlineSeconds"),
    # Secrets where only references belong.
    ({"settings": {"admin_keys": ["mg_live_0123456789abcdef"]}}, "/settings"),
    ({"settings": {"stripe_live_key": "sk_live_0123456789"}}, "invalid propertyName 'stripe_live_key'"),
    ({"secretSettings": [{"setting": "notify_secret", "secret": {"name": "", "key": "k"}}]}, "/secretSettings/0"),
    ({"database": {"url": "postgresql://u:password@db/x", "existingSecret": {"name": "", "key": "k"}}},
     "/database/url"),
    ({"redis": {"url": "redis://:password@redis:6379", "existingSecret": {"name": "", "key": "k"}}}, "/redis/url"),
    # Shapes metergate would refuse at start-up anyway.
    ({"routes": [{"prefix": "openai", "upstream": "https://api.openai.com"}]}, "/routes/0/prefix"),
    ({"logFormat": "xml"}, "/logFormat"),
    ({"replicaCount": 2}, "replicaCount"),  # a typo'd key at the top level is refused, not ignored
    # Disruption budgets: exactly one of minAvailable and maxUnavailable, a count or a percentage.
    ({"podDisruptionBudget": {"enabled": True, "minAvailable": 1}}, "/podDisruptionBudget"),  # both set
    ({"podDisruptionBudget": {"enabled": True, "maxUnavailable": None}}, "/podDisruptionBudget"),  # neither
    ({"podDisruptionBudget": {"enabled": True, "maxUnavailable": "150%"}}, "/podDisruptionBudget/maxUnavailable"),
    ({"podDisruptionBudget": {"enabled": True, "maxUnavailable": -1}}, "/podDisruptionBudget/maxUnavailable"),
    # Autoscalers: a replica range and at least one target.
    ({"gateway": {"enabled": True, "autoscaling": {"enabled": True, "minReplicas": 0, "maxReplicas": 3}}},
     "/gateway/autoscaling/minReplicas"),
    ({"control": {"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": None}}},
     "/control/autoscaling"),
    ({"control": {"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": 0}}},
     "/control/autoscaling/targetCPUUtilizationPercentage"),
    # Monitoring.
    ({"metrics": {"serviceMonitor": {"enabled": True, "interval": "30 seconds"}}},
     "/metrics/serviceMonitor/interval"),
    ({"metrics": {"prometheusRule": {"enabled": True, "serverErrorRatio": 5}}},
     "/metrics/prometheusRule/serverErrorRatio"),
    ({"metrics": {"prometheusRule": {"enabled": True, "selector": '{namespace="x"}'}}},
     "/metrics/prometheusRule/selector"),
    ({"metrics": {"dashboard": {"enabled": "yes"}}}, "/metrics/dashboard/enabled"),
])
def test_schema_rejects_bad_values(chart: helm_python.Chart, values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=complaint):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_an_autoscaler_takes_replicas_over_from_its_deployment(chart: helm_python.Chart) -> None:
    objects = render(chart, EDGE_CASES["observability-everything-on"])
    for component in ("control", "gateway"):
        deployment = find(objects, "Deployment", f"-{component}")
        assert "replicas" not in deployment["spec"]  # else every upgrade would reset what the autoscaler chose
        hpa = find(objects, "HorizontalPodAutoscaler", f"-{component}")
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                 "name": deployment["metadata"]["name"]}
    gateway = find(objects, "HorizontalPodAutoscaler", "-gateway")["spec"]
    assert (gateway["minReplicas"], gateway["maxReplicas"]) == (2, 10)
    assert [(m["resource"]["name"], m["resource"]["target"]["averageUtilization"]) for m in gateway["metrics"]] == [
        ("cpu", 70), ("memory", 80)]
    plain = render(chart, {"gateway": {"enabled": True, "replicaCount": 3}})
    assert find(plain, "Deployment", "-gateway")["spec"]["replicas"] == 3
    assert not [o for o in plain if o["kind"] == "HorizontalPodAutoscaler"]
    with pytest.raises(helm_python.HelmRenderError, match=r"minReplicas \(5\) exceeds maxReplicas \(2\)"):
        render(chart, {"gateway": {"enabled": True,
                                   "autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}})


def test_each_deployment_gets_a_disruption_budget_over_its_own_pods(chart: helm_python.Chart) -> None:
    objects = render(chart, EDGE_CASES["observability-everything-on"])
    for component in ("control", "gateway"):
        budget = find(objects, "PodDisruptionBudget", f"-{component}")["spec"]
        pod_labels = find(objects, "Deployment", f"-{component}")["spec"]["template"]["metadata"]["labels"]
        assert budget["selector"]["matchLabels"].items() <= pod_labels.items()
        assert budget["selector"]["matchLabels"]["app.kubernetes.io/component"] == component
        assert budget == {"maxUnavailable": 1, "selector": budget["selector"]}  # one replica never blocks a drain
    percent = render(chart, EDGE_CASES["budget-as-percentage-memory-only-autoscaler"])
    [budget] = [o["spec"] for o in percent if o["kind"] == "PodDisruptionBudget"]  # no gateway, no budget for it
    assert budget["minAvailable"] == "50%" and "maxUnavailable" not in budget
    assert not [o for o in render(chart, {}) if o["kind"] == "PodDisruptionBudget"]


def test_service_monitor_scrapes_metrics_of_both_services(chart: helm_python.Chart) -> None:
    objects = render(chart, EDGE_CASES["observability-everything-on"])
    monitor = find(objects, "ServiceMonitor", "-metergate")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    selected = [o for o in objects if o["kind"] == "Service"
                and monitor["spec"]["selector"]["matchLabels"].items() <= o["metadata"]["labels"].items()]
    assert sorted(s["metadata"]["name"] for s in selected) == ["billing-metergate-control", "billing-metergate-gateway"]
    for service in selected:
        assert endpoint["port"] in [p["name"] for p in service["spec"]["ports"]]
    kinds = {o["kind"] for o in render(chart, {})}
    assert not kinds & {"ServiceMonitor", "PrometheusRule"}  # off by default: the CRDs may not exist
    # The validator has teeth: a field the schema does not know is refused, as kubernetes-validate would.
    monitor["spec"]["endpoints"][0]["honorLabelz"] = True
    with pytest.raises(jsonschema.ValidationError, match="honorLabelz"):
        prometheus_operator.validate(monitor)


def test_redis_keeps_only_the_windows_unless_the_redis_wallet_is_asked_for(chart: helm_python.Chart) -> None:
    for wallet, expected in ((None, None), (True, True), (False, None)):
        values: dict[str, Any] = {"redis": {"url": "redis://redis:6379/0",
                                            **({} if wallet is None else {"wallet": wallet})}}
        config = find(render(chart, values), "ConfigMap", "-config")["data"]
        for name in ("sidecar.yaml", "control.yaml"):
            assert yaml.safe_load(config[name]).get("redis_wallet") == expected, (wallet, name)
