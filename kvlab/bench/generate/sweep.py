"""`kvlab bench --sweep KEY=V1,V2,...`: one experiment per value, then PPL and TPOT vs the value.

Each value is an ordinary experiment (`<name>-<value>`, all files as usual); the sweep adds
results/<technique>/<name>-sweep/{sweep.md, sweep.json, sweep.png} built from those files.
"""

import json
from pathlib import Path

import yaml

from kvlab.bench.core.writer import portable
from kvlab.errors import ConfigError


def parse_sweep(spec: str) -> tuple[str, list]:
    key, sep, raw = spec.partition("=")
    try:
        values = [yaml.safe_load(v) for v in raw.split(",") if v.strip()] if sep else []
    except yaml.YAMLError:
        raise ConfigError(f"--sweep {key}: cannot parse the values {raw!r}") from None
    if not key or len(values) < 2:
        raise ConfigError(f"--sweep expects KEY=V1,V2[,...] with at least two values, got {spec!r}")
    names = [str(value) for value in values]  # each value's experiment is <name>-<value>
    if len(set(names)) < len(names):
        raise ConfigError(f"--sweep {key}: the values {names} repeat one (each names its own experiment)")
    return key, values


def write_sweep(key: str, values: list, experiment_dirs: list[Path], out_dir: Path) -> Path:
    rows = []
    for value, directory in zip(values, experiment_dirs, strict=True):
        payload = json.loads((directory / "results.json").read_text())
        quality = payload.get("quality") or {}
        for run in payload["runs"]:
            rows.append(
                {
                    "value": value,
                    "dtype": run["dtype"],
                    "prompt_len": run["prompt_len"],
                    "method": run["method"],
                    "tpot_ms": run["tpot_s"]["median"] * 1000,
                    "kv_mib": run["kv_cache_bytes"] / 2**20,
                    "press_ppl": quality.get("press_ppl"),
                    "full_ppl": quality.get("full_ppl"),
                }
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sweep.json").write_text(json.dumps({"key": key, "values": values, "rows": rows}, indent=1))
    built_from = [portable(str(directory)) for directory in experiment_dirs]
    lines = [
        f"# Sweep over {key}",
        "",
        "Built from: " + ", ".join(f"`{d}`" for d in built_from),
        "",
        f"| {key} | dtype | prompt | method | TPOT ms | KV MiB | PPL (press) | PPL (full) |",
        "|---:|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        ppl = f"{r['press_ppl']:.3f}" if r["press_ppl"] is not None else ""
        full = f"{r['full_ppl']:.3f}" if r["full_ppl"] is not None else ""
        lines.append(
            f"| {r['value']} | {r['dtype']} | {r['prompt_len']} | {r['method']} | {r['tpot_ms']:.1f} "
            f"| {r['kv_mib']:.2f} | {ppl} | {full} |"
        )
    lines += ["", "![sweep](sweep.png)"]
    (out_dir / "sweep.md").write_text("\n".join(lines) + "\n")
    _plot(key, rows, out_dir / "sweep.png")
    return out_dir


def _plot(key: str, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    longest = max(r["prompt_len"] for r in rows)
    chosen = [r for r in rows if r["prompt_len"] == longest and r["method"] == "optimized"]
    base = [r for r in rows if r["prompt_len"] == longest and r["method"] == "baseline"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    values = [r["value"] for r in chosen]
    if all(r["press_ppl"] is not None for r in chosen):
        left.plot(values, [r["press_ppl"] for r in chosen], marker="o", label="press")
        left.axhline(chosen[0]["full_ppl"], color="grey", linestyle=":", label="full cache")
    left.set_xlabel(key)
    left.set_ylabel("PPL")
    left.legend()
    right.plot(values, [r["tpot_ms"] for r in chosen], marker="o", label="optimized")
    right.plot(values, [r["tpot_ms"] for r in base], marker="s", label="baseline generate()")
    right.set_xlabel(key)
    right.set_ylabel(f"TPOT ms (prompt {longest})")
    right.legend()
    for axis in (left, right):
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
