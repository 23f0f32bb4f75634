"""`kvlab report cost`: measured throughput -> $ per 1M output tokens and requests/s per replica.

Prices come from a YAML table the user edits (configs/cost/prices.yaml: instance name -> $/hour);
throughput from a bench's results.json, read by one small function per result kind (READERS), keyed
by the technique that wrote it. The arithmetic, per run and instance type, with each replica on an
instance of its own (one pod per node, as the HPA adds them):

    $/hour              = replicas * usd_per_hour
    $ per 1M out tokens = $/hour / (output tokens/s * 3600) * 1e6
    requests/s/replica  = requests/s / replicas

The throughput is what the bench's machine measured; on another instance type it is a guess until
the bench runs there, and the report says on which machine it was measured.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvlab.bench.core.config import read_yaml
from kvlab.bench.core.writer import portable, read_results
from kvlab.errors import ConfigError

DEFAULT_PRICES = Path("configs/cost/prices.yaml")
REPORT_NAME = "cost.md"
INSTANCE_KEYS = ("usd_per_hour", "cpus", "notes")


@dataclass(slots=True, frozen=True)
class Instance:
    name: str
    usd_per_hour: float
    cpus: int | None = None
    notes: str = ""

    def __post_init__(self):
        price = self.usd_per_hour
        if isinstance(price, bool) or not isinstance(price, int | float) or not price > 0:
            raise ConfigError(f"instance {self.name!r}: usd_per_hour must be a number > 0, got {price!r}")
        if self.cpus is not None and (
            isinstance(self.cpus, bool) or not isinstance(self.cpus, int) or self.cpus < 1
        ):
            raise ConfigError(f"instance {self.name!r}: cpus must be an integer >= 1, got {self.cpus!r}")
        if not isinstance(self.notes, str):
            raise ConfigError(f"instance {self.name!r}: notes must be text, got {self.notes!r}")


@dataclass(slots=True, frozen=True)
class ThroughputRun:
    """One measured configuration: `replicas` servers together produced these rates."""

    label: str
    replicas: int
    output_tokens_per_s: float
    requests_per_s: float

    def __post_init__(self):
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or self.replicas < 1:
            raise ConfigError(f"run {self.label!r}: replicas must be an integer >= 1, got {self.replicas!r}")
        for name in ("output_tokens_per_s", "requests_per_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"run {self.label!r}: {name} must be a number > 0, got {value!r}")


def load_prices(path: Path) -> dict[str, Instance]:
    """The price table: `instances: {name: {usd_per_hour, cpus, notes}}`; anything else is an error."""
    if not path.is_file():
        raise ConfigError(f"price table {path} does not exist (pass --prices FILE)")
    data = read_yaml(path)
    if set(data) != {"instances"}:
        raise ConfigError(f"{path}: expected one top-level key 'instances', got {sorted(data) or 'none'}")
    table = data["instances"]
    if not isinstance(table, dict) or not table:
        raise ConfigError(f"{path}: 'instances' must map instance names to their prices")
    instances = {}
    for name, entry in table.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: instance {name!r} must be a mapping with usd_per_hour")
        unknown = sorted(set(entry) - set(INSTANCE_KEYS))
        if unknown:
            raise ConfigError(
                f"{path}: instance {name!r} has unknown key {unknown[0]!r}; valid keys: {', '.join(INSTANCE_KEYS)}"
            )
        if "usd_per_hour" not in entry:
            raise ConfigError(f"{path}: instance {name!r} has no usd_per_hour")
        try:
            instances[str(name)] = Instance(str(name), **entry)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None
    return instances


def select(instances: dict[str, Instance], names: list[str] | None) -> list[Instance]:
    """The instances `names` picks (all when None), in the order given."""
    if not names:
        return list(instances.values())
    for name in names:
        if name not in instances:
            raise ConfigError(f"unknown instance {name!r}; the price table has {', '.join(instances)}")
    return [instances[name] for name in dict.fromkeys(names)]


def _paged_runs(payload: dict[str, Any]) -> list[ThroughputRun]:
    """The paged bench's mixed workload: the engine and HF static batching on the same requests, one
    after the other in one process (output tokens/s counts requested tokens only, as its report does)."""
    mixed = payload.get("mixed")
    if not mixed:
        raise ConfigError("this paged result has no mixed-workload run (the one with throughput)")
    dtype = payload["config"].get("dtype", "")
    num_requests = len(mixed["requests"])
    return [
        ThroughputRun(f"{label}, {dtype}", 1, run["output_tokens_per_s"], num_requests / run["wall_s"])
        for label, run in (("engine", mixed["engine"]), ("HF static batching", mixed["hf_static"]))
    ]


def _serving_runs(payload: dict[str, Any]) -> list[ThroughputRun]:
    """The serving bench: `runs`, each with its label, replicas and measured rates."""
    runs = payload.get("runs")
    if not isinstance(runs, list) or not runs:
        raise ConfigError("this serving result has no runs")
    fields = ("label", "replicas", "output_tokens_per_s", "requests_per_s")
    result = []
    for index, run in enumerate(runs):
        missing = [name for name in fields if name not in run]
        if missing:
            raise ConfigError(f"serving run {index} lacks {', '.join(missing)}")
        result.append(ThroughputRun(*(run[name] for name in fields)))
    return result


READERS: dict[str, Callable[[dict[str, Any]], list[ThroughputRun]]] = {
    "paged": _paged_runs,
    "serving": _serving_runs,
}


def read_runs(path: Path) -> tuple[dict[str, Any], list[ThroughputRun]]:
    """(the results payload, its throughput runs) of an experiment dir or its results.json."""
    if not path.exists():
        raise ConfigError(f"results {path} do not exist")
    payload = read_results(path)
    technique = (payload.get("config") or {}).get("technique")
    reader = READERS.get(technique)
    if reader is None:
        raise ConfigError(
            f"{path}: no throughput to price in results of technique {technique!r}; "
            f"kvlab report cost reads {', '.join(READERS)} results"
        )
    try:
        return payload, reader(payload)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    except (KeyError, TypeError, ZeroDivisionError) as error:
        raise ConfigError(
            f"{path}: malformed {technique} results ({type(error).__name__}: {error})"
        ) from None


def usd_per_million_tokens(usd_per_hour: float, output_tokens_per_s: float) -> float:
    return usd_per_hour / (output_tokens_per_s * 3600) * 1e6


def cost_table(runs: list[ThroughputRun], instances: list[Instance]) -> list[str]:
    lines = [
        "| run | replicas | instance | $/hour | output tok/s | requests/s per replica | $ per 1M output tokens |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for run in runs:
        for instance in instances:
            usd_per_hour = run.replicas * instance.usd_per_hour
            lines.append(
                f"| {run.label} | {run.replicas} | {instance.name} | {usd_per_hour:.4f} "
                f"| {run.output_tokens_per_s:.1f} | {run.requests_per_s / run.replicas:.3f} "
                f"| {usd_per_million_tokens(usd_per_hour, run.output_tokens_per_s):.3f} |"
            )
    return lines


def render(results: Path, prices: Path, payload: dict[str, Any], runs, instances) -> str:
    config, machine = payload.get("config") or {}, payload.get("machine") or {}
    measured_on = ", ".join(
        str(part)
        for part in (
            machine.get("cpu"),
            machine.get("cores") and f"{machine['cores']} cores",
            machine.get("torch_threads") and f"{machine['torch_threads']} torch threads",
            machine.get("gpu"),
        )
        if part
    )
    lines = [
        f"# cost / {config.get('technique')} / {config.get('experiment_name')}",
        "",
        f"Throughput from `{portable(str(results))}`, measured on: {measured_on or 'unknown machine'}; "
        f"prices from `{portable(str(prices))}` (examples to edit, not quotes).",
        "",
        *cost_table(runs, instances),
        "",
        "Each replica runs on an instance of its own: $/hour = replicas x the instance's price; "
        "$ per 1M output tokens = $/hour / (output tok/s x 3600) x 1e6. An instance other than the "
        "measuring machine delivers other throughput: bench there to make its rows true.",
        "",
    ]
    return "\n".join(lines)


def cost_report(
    results: Path, prices: Path = DEFAULT_PRICES, names: list[str] | None = None, write: bool = True
) -> tuple[str, Path | None]:
    """(the Markdown report, where it was written or None). Written as cost.md beside the results."""
    instances = select(load_prices(prices), names)
    payload, runs = read_runs(results)
    text = render(results, prices, payload, runs, instances)
    if not write:
        return text, None
    target = (results if results.is_dir() else results.parent) / REPORT_NAME
    try:
        target.write_text(text)
    except OSError as error:
        raise ConfigError(
            f"cannot write {target}: {error.strerror} (pass --no-write to print only)"
        ) from None
    return text, target
