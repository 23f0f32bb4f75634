"""What the deploy tests read: the files under deploy/, the server's contract (its port, routes and
metrics), and a small PromQL checker for the dashboard's expressions."""

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
COMPOSE = DEPLOY / "docker-compose.yml"

# kvlab serve's contract (issue 13): the port the deployment serves on, its GET routes for probes and
# scraping, and the keys of serve.yaml (engine: EngineConfig's fields; press: {name, budget, options}).
SERVER_PORT = 8000
LIVENESS_ROUTE, READINESS_ROUTE, METRICS_ROUTE = "/health", "/ready", "/metrics"
SERVE_KEYS = {
    "model",
    "host",
    "port",
    "max_queue",
    "drain_timeout_s",
    "api_key_env",
    "max_body_bytes",
    "threads",
    "engine",
    "press",
}


def metric_types() -> dict[str, str]:
    """name -> counter | gauge | histogram, from metric_names.txt (the one list of the server's metrics)."""
    metrics = {}
    for line in (Path(__file__).parent / "metric_names.txt").read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if fields:
            metrics[fields[0]] = fields[1]
    return metrics


def yaml_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def one(documents: list[dict], kind: str) -> dict:
    matching = [doc for doc in documents if doc["kind"] == kind]
    assert len(matching) == 1, f"expected one {kind}, found {len(matching)}"
    return matching[0]


def kustomize_resources() -> list[dict]:
    """The documents `kubectl apply -k deploy/k8s` applies (its kustomization's resources)."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"] for doc in yaml_documents(K8S / name)]


def serve_yaml() -> dict:
    """serve.yaml as the ConfigMap holds it."""
    configmap = one(kustomize_resources(), "ConfigMap")
    return yaml.safe_load(configmap["data"]["serve.yaml"])


def dockerfile_stages(path: Path = DOCKERFILE) -> list[list[tuple[str, str]]]:
    """The Dockerfile as stages, each a list of (INSTRUCTION, arguments), continuation lines joined
    and comments dropped."""
    logical, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    stages: list[list[tuple[str, str]]] = []
    for line in logical:
        instruction, _, arguments = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction.upper(), arguments.strip()))
    return stages


# PromQL: functions and aggregations an expression may call, and the keywords between them.
PROMQL_FUNCTIONS = {
    "abs", "avg", "avg_over_time", "ceil", "clamp_max", "clamp_min", "count", "count_over_time", "delta",
    "deriv", "floor", "histogram_quantile", "idelta", "increase", "irate", "label_replace", "max",
    "max_over_time", "min", "min_over_time", "quantile", "rate", "round", "scalar", "sum",
    "sum_over_time", "topk", "bottomk", "vector",
}  # fmt: skip
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}  # fmt: skip
COUNTER_FUNCTIONS = ("rate", "irate", "increase")


def promql_problems(expr: str, metrics: dict[str, str]) -> list[str]:
    """What is wrong with `expr` against the metric list: a name the server does not export, an unknown
    function, a counter read without rate()/increase(), a histogram read other than through its
    _bucket series in histogram_quantile(... by (le)) or its _sum / _count, a gauge under rate()."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors ($__rate_interval)
    grouping = re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", text)
    text = re.sub(r"(?<![\w:])\d+(\.\d+)?([eE][+-]?\d+)?", "", text)  # numbers (1e6 is not a name)
    problems = []
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        name = match.group(0)
        if name in PROMQL_KEYWORDS or name in PROMQL_FUNCTIONS:  # `sum by (le) (...)`: not followed by (
            continue
        if text[match.end() :].lstrip().startswith("("):
            problems.append(f"unknown function {name}()")
            continue
        wrapped = re.search(r"([A-Za-z_]+)\(\s*$", text[: match.start()])
        function = wrapped.group(1) if wrapped else None
        family, suffix = name, ""
        for ending in ("_bucket", "_sum", "_count"):
            if (
                name not in metrics
                and name.endswith(ending)
                and metrics.get(name[: -len(ending)]) == "histogram"
            ):
                family, suffix = name[: -len(ending)], ending
        kind = metrics.get(family)
        if kind is None:
            problems.append(f"{name} is not a metric kvlab serve exports")
        elif kind == "counter" and function not in COUNTER_FUNCTIONS:
            problems.append(f"counter {name} read without rate() or increase()")
        elif kind == "histogram" and suffix == "":
            problems.append(f"histogram {name} read without _bucket, _sum or _count")
        elif suffix == "_bucket" and not (
            "histogram_quantile" in text and any("le" in g.replace(" ", "").split(",") for g in grouping)
        ):
            problems.append(f"{name} outside histogram_quantile(..., sum by (le) (...))")
        elif suffix and function not in COUNTER_FUNCTIONS:
            problems.append(f"histogram series {name} read without rate() or increase()")
        elif kind == "gauge" and function in COUNTER_FUNCTIONS:
            problems.append(f"gauge {name} under {function}()")
    return problems


def metrics_named(expr: str, metrics: dict[str, str]) -> set[str]:
    """The metric families of the list that `expr` reads."""
    names = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr))
    return {
        family
        for family in metrics
        if family in names or any(family + suffix in names for suffix in ("_bucket", "_sum", "_count"))
    }
