"""deploy/k8s as a specification: every manifest is a valid object of a pinned Kubernetes release
(strict schemas: an unknown or misspelt field fails), and the objects agree with each other and with
kvlab serve -- probes on its routes, one port everywhere, a serve.yaml of known keys, an HPA on the
Deployment scaling on a metric that the prometheus-adapter rule serves and the server exports."""

import copy
import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml
from deploy_files import (
    K8S,
    LIVENESS_ROUTE,
    METRICS_ROUTE,
    READINESS_ROUTE,
    SERVE_KEYS,
    SERVER_PORT,
    kustomize_resources,
    metric_types,
    one,
    serve_yaml,
    yaml_documents,
)

from kvlab.engine.config import EngineConfig

# Validated against this release's schemas (bundled with kubernetes-validate, offline).
KUBERNETES_VERSION = "1.30.0"
# Custom resources have no schema in Kubernetes' own: they need their operator, so they are skipped
# here by name and checked for consistency below instead.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"): "needs the Prometheus Operator's CRD"}
MANIFESTS = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def validate(doc: dict) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_validates_strictly(path):
    documents = yaml_documents(path)
    assert documents, f"{path} holds no object"
    for doc in documents:
        reason = CRD_KINDS.get((doc["apiVersion"], doc["kind"]))
        if reason:
            pytest.skip(f"{doc['kind']} is a custom resource: {reason}; no schema check")
        validate(doc)


def deployment() -> dict:
    return one(kustomize_resources(), "Deployment")


@pytest.mark.parametrize(
    "plant",
    [
        lambda d: d["spec"]["template"]["spec"]["containers"][0].update(livenessProbes={}),  # misspelt
        lambda d: d["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(containerPort="8000"),
        lambda d: d["spec"].update(replica=2),
        lambda d: d["spec"]["template"]["spec"].pop("containers"),
    ],
    ids=["unknown-field", "wrong-type", "unknown-spec-field", "missing-required"],
)
def test_validation_catches_a_planted_error(plant):
    bad = copy.deepcopy(deployment())
    validate(bad)  # the real one passes...
    plant(bad)
    with pytest.raises(kubernetes_validate.ValidationError):  # ...and the planted error does not
        validate(bad)


def test_the_kustomization_applies_every_top_level_manifest():
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"}
    kinds = {doc["kind"] for doc in kustomize_resources()}
    assert kinds == {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_renders_valid_objects():
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    documents = [doc for doc in yaml.safe_load_all(rendered) if doc]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in documents) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in kustomize_resources()
    )
    for doc in documents:
        validate(doc)


def container() -> dict:
    return deployment()["spec"]["template"]["spec"]["containers"][0]


def probe_port(probe: dict) -> int:
    port = probe["httpGet"]["port"]
    return next(p["containerPort"] for p in container()["ports"] if port in (p["name"], p["containerPort"]))


def test_probes_point_at_the_servers_routes():
    c = container()
    assert c["startupProbe"]["httpGet"]["path"] == LIVENESS_ROUTE
    assert c["livenessProbe"]["httpGet"]["path"] == LIVENESS_ROUTE
    assert c["readinessProbe"]["httpGet"]["path"] == READINESS_ROUTE
    for name in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert probe_port(c[name]) == SERVER_PORT
    # The model load and a first-start calibration get minutes, not the liveness probe's 30 s.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


def test_one_port_everywhere():
    (port,) = container()["ports"]
    assert port["containerPort"] == SERVER_PORT
    assert serve_yaml()["port"] == SERVER_PORT
    service = one(kustomize_resources(), "Service")
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] in (port["name"], port["containerPort"])
    assert service_port["port"] == SERVER_PORT
    annotations = deployment()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(SERVER_PORT)
    assert annotations["prometheus.io/path"] == METRICS_ROUTE


def test_the_service_selects_the_pods():
    service = one(kustomize_resources(), "Service")
    pod_labels = deployment()["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment()["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_serve_yaml_has_only_known_keys():
    config = serve_yaml()
    assert set(config) <= SERVE_KEYS, set(config) - SERVE_KEYS
    assert config["host"] == "0.0.0.0"  # reachable from the Service, not only from the pod
    EngineConfig.from_dict(config["engine"])  # raises ConfigError on an unknown key or a bad value


def test_serve_yaml_loads_through_the_servers_own_loader(tmp_path):
    """Once kvlab.server lands, its loader is the judge of serve.yaml: the one `kvlab serve --config`
    runs (defaults < YAML < --set < flags), with the flags the image's entrypoint adds."""
    server_config = pytest.importorskip("kvlab.server.config")
    path = tmp_path / "serve.yaml"
    path.write_text(one(kustomize_resources(), "ConfigMap")["data"]["serve.yaml"])
    config = server_config.resolve_config(path, [], {"host": "0.0.0.0"})
    assert config.port == SERVER_PORT
    assert config.drain_timeout_s == serve_yaml()["drain_timeout_s"]


def test_the_config_is_mounted_where_the_server_reads_it():
    c, spec = container(), deployment()["spec"]["template"]["spec"]
    config_path = c["args"][c["args"].index("--config") + 1]
    mount = next(m for m in c["volumeMounts"] if config_path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    configmap = one(kustomize_resources(), "ConfigMap")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert config_path.removeprefix(mount["mountPath"] + "/") in configmap["data"]


def test_sigterm_drains_before_sigkill():
    grace = deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > serve_yaml()["drain_timeout_s"]


def test_runs_as_non_root_with_resources():
    spec = deployment()["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    c = container()
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    for resource in ("cpu", "memory"):
        assert c["resources"]["requests"][resource] and c["resources"]["limits"][resource]
    # torch's threads follow the CPU limit, not the node's core count.
    threads = next(e for e in c["env"] if e["name"] == "OMP_NUM_THREADS")
    assert threads["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"
    # The HPA owns the replica count.
    assert "replicas" not in deployment()["spec"]


def hpa() -> dict:
    return one(kustomize_resources(), "HorizontalPodAutoscaler")


def test_the_hpa_scales_the_deployment_on_queue_depth():
    spec = hpa()["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "kvlab"}
    assert deployment()["metadata"]["name"] == spec["scaleTargetRef"]["name"]
    (metric,) = spec["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "kvlab_queue_depth"
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert float(metric["pods"]["target"]["averageValue"]) > 0
    assert metric_types()["kvlab_queue_depth"] == "gauge"  # a level per pod, averaged over pods
    assert 1 <= spec["minReplicas"] < spec["maxReplicas"]


def adapter_rules() -> list[dict]:
    (configmap,) = yaml_documents(K8S / "prometheus-adapter" / "adapter-config.yaml")
    return yaml.safe_load(configmap["data"]["config.yaml"])["rules"]


def test_the_adapter_rule_serves_the_metric_the_hpa_names():
    name = hpa()["spec"]["metrics"][0]["pods"]["metric"]["name"]
    rule = next(r for r in adapter_rules() if r["name"]["as"] == name)
    series = rule["seriesQuery"].split("{", 1)[0].strip("'\" ")
    assert series in metric_types(), f"the adapter reads {series}, which kvlab serve does not export"
    # A Pods metric is looked up per pod in the HPA's namespace: both labels must map to resources.
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]


def test_the_optional_service_monitor_scrapes_the_service():
    (monitor,) = yaml_documents(K8S / "optional" / "servicemonitor.yaml")
    service = one(kustomize_resources(), "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == METRICS_ROUTE
