"""deploy/docker-compose.yml with Prometheus and Grafana as a specification: the files it mounts exist,
Prometheus scrapes the kvlab service on the port the server listens on, Grafana's provisioned
datasource and dashboard folder match the compose services and mounts, and every PromQL expression
on the dashboard reads only metrics kvlab serve exports, each the way its type allows."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from deploy_files import (
    COMPOSE,
    DEPLOY,
    METRICS_ROUTE,
    SERVER_PORT,
    metric_types,
    metrics_named,
    promql_problems,
    serve_yaml,
)

GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "kvlab.json"


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def mounts(service: dict) -> dict[str, Path]:
    """container path -> host path (relative to the compose file) of a service's bind mounts."""
    result = {}
    for volume in service.get("volumes", []):
        host, container, *_ = volume.split(":")
        result[container] = (COMPOSE.parent / host).resolve()
    return result


def seconds(duration: str) -> float:
    units = {"s": 1, "m": 60}
    return float(duration[:-1]) * units[duration[-1]]


def test_compose_runs_the_three_services():
    services = compose()["services"]
    assert set(services) == {"kvlab", "prometheus", "grafana"}
    build = services["kvlab"]["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert (context / build["dockerfile"]).is_file()
    assert (context / "pyproject.toml").is_file()  # the context is the repository root


def test_kvlab_listens_and_publishes_on_the_server_port():
    kvlab = compose()["services"]["kvlab"]
    command = kvlab["command"]
    assert int(command[command.index("--port") + 1]) == SERVER_PORT
    assert f"{SERVER_PORT}:{SERVER_PORT}" in kvlab["ports"]
    # SIGTERM drains for the server's drain timeout before Docker's SIGKILL.
    assert seconds(kvlab["stop_grace_period"]) > serve_yaml()["drain_timeout_s"]
    assert kvlab["environment"]["OMP_NUM_THREADS"] == str(kvlab["cpus"])


def test_every_mounted_file_exists():
    for name, service in compose()["services"].items():
        for container, host in mounts(service).items():
            assert host.exists(), f"{name} mounts {host} at {container}, which does not exist"


@pytest.mark.skipif(
    shutil.which("docker") is None and shutil.which("docker-compose") is None, reason="no docker CLI"
)
def test_docker_compose_accepts_the_file(tmp_path):
    plugin = shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True)
    if plugin and plugin.returncode == 0:
        command = ["docker", "compose"]
    elif shutil.which("docker-compose"):
        command = ["docker-compose"]
    else:
        pytest.skip("the docker CLI has no compose plugin and docker-compose is not installed")

    def check(path):
        return subprocess.run(
            [*command, "-f", str(path), "config", "-q"], capture_output=True, text=True, timeout=120
        )

    result = check(COMPOSE)
    assert result.returncode == 0, result.stderr
    planted = tmp_path / "compose.yml"  # a misspelt option must fail the same check
    planted.write_text("services:\n  kvlab:\n    image: kvlab:0.1.0\n    stop_grace_periods: 45s\n")
    assert check(planted).returncode != 0


def prometheus_config() -> dict:
    prometheus = compose()["services"]["prometheus"]
    host = mounts(prometheus)["/etc/prometheus/prometheus.yml"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    return yaml.safe_load(host.read_text())


def test_prometheus_scrapes_kvlab_on_the_server_port():
    (job,) = [j for j in prometheus_config()["scrape_configs"] if j["job_name"] == "kvlab"]
    assert job.get("metrics_path", "/metrics") == METRICS_ROUTE
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert targets == [f"kvlab:{SERVER_PORT}"]
    assert "kvlab" in compose()["services"]  # the target's host is the compose service


def test_grafana_is_provisioned_from_the_repository():
    grafana = compose()["services"]["grafana"]
    mounted = mounts(grafana)
    assert mounted["/etc/grafana/provisioning"] == (GRAFANA / "provisioning").resolve()
    (datasource,) = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"  # the compose service, Prometheus' port
    assert "9090:9090" in compose()["services"]["prometheus"]["ports"]
    (provider,) = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "kvlab.yaml").read_text())[
        "providers"
    ]
    folder = provider["options"]["path"]
    assert mounted[folder] == DASHBOARD.parent.resolve()


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def expressions() -> list[str]:
    return [target["expr"] for panel in dashboard()["panels"] for target in panel["targets"]]


def test_the_dashboard_uses_the_provisioned_prometheus():
    board = dashboard()
    (variable,) = board["templating"]["list"]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        assert panel["targets"], panel["title"]
        for item in [panel, *panel["targets"]]:
            assert item["datasource"] == {"type": "prometheus", "uid": f"${{{variable['name']}}}"}


def test_every_expression_reads_only_exported_metrics_correctly():
    metrics = metric_types()
    problems = {expr: promql_problems(expr, metrics) for expr in expressions()}
    assert not {expr: p for expr, p in problems.items() if p}


def test_the_dashboard_shows_every_metric():
    shown = set().union(*(metrics_named(expr, metric_types()) for expr in expressions()))
    assert shown == set(metric_types())


def test_latency_panels_show_p50_p90_p99():
    for metric in (
        "kvlab_time_to_first_token_seconds",
        "kvlab_time_per_output_token_seconds",
        "kvlab_e2e_request_latency_seconds",
    ):
        quantiles = sorted(
            float(expr.split("(", 1)[1].split(",", 1)[0])
            for expr in expressions()
            if f"{metric}_bucket" in expr and expr.startswith("histogram_quantile(")
        )
        assert quantiles == [0.5, 0.9, 0.99], metric


@pytest.mark.parametrize(
    "expr, problem",
    [
        ("sum(kvlab_queue_lenght)", "not a metric kvlab serve exports"),
        ("sum(kvlab_generated_tokens_total)", "read without rate() or increase()"),
        ("rate(kvlab_queue_depth[5m])", "gauge kvlab_queue_depth under rate()"),
        (
            "histogram_quantile(0.9, rate(kvlab_e2e_request_latency_seconds_bucket[5m]))",
            "outside histogram_quantile",
        ),
        ("avg(kvlab_time_to_first_token_seconds)", "read without _bucket, _sum or _count"),
        ("rat(kvlab_prompt_tokens_total[1m])", "unknown function rat()"),
        ("sum(rate(process_cpu_seconds_total[1m]))", "not a metric kvlab serve exports"),
    ],
)
def test_the_promql_check_catches_a_planted_mistake(expr, problem):
    assert any(problem in p for p in promql_problems(expr, metric_types()))
