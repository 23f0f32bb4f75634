"""Self-describing results: results.json (versioned, raw samples), config.yaml, report.md and plots.

Layout: results/<technique>/<experiment>/. An existing experiment is never overwritten silently.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import yaml

from kvlab.bench.machine import machine_info
from kvlab.bench.runner import BenchResult, RunRecord
from kvlab.errors import ConfigError

SCHEMA_VERSION = 1
RESULTS_ROOT = Path("results")


def experiment_dir(technique: str, experiment: str, root: Path = RESULTS_ROOT) -> Path:
    return root / technique / experiment


def claim_experiment_dir(path: Path, overwrite: bool) -> None:
    """Fail before any work if results exist and --overwrite was not given."""
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise ConfigError(
            f"{path} already holds results; pass --overwrite or choose another --experiment-name"
        )


def write_experiment(path: Path, payload: dict, config: dict, plot, render) -> Path:
    """Write results.json, config.yaml, plots and report.md beside `path`, then swap them in, so an
    interrupted run never leaves half an experiment. plot(dir) -> plot names; render(payload, plots) -> md."""
    staging = path.with_name(path.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    (staging / "results.json").write_text(json.dumps(payload, indent=1))
    (staging / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    plots = plot(staging)
    (staging / "report.md").write_text(render(payload, plots))
    shutil.rmtree(path, ignore_errors=True)
    staging.rename(path)
    return path


def write_report(result: BenchResult, path: Path, command: str) -> Path:
    payload = {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "machine": machine_info(),
        "model": {
            "name": result.model_name,
            "source": result.model_source,
            "meaningful_ppl": result.meaningful_ppl,
        },
        "config": result.config.to_dict(),
        "floors": {
            dtype: {
                "weight_bytes_per_token": floor.weight_bytes_per_token,
                "bandwidth_bytes_per_s": floor.bandwidth_bytes_per_s,
                "floor_tpot_s": floor.tpot_s,
            }
            for dtype, floor in result.floors.items()
        },
        "runs": [dataclasses.asdict(run) for run in result.runs],
        "agreement": [dataclasses.asdict(a) for a in result.agreement],
        "ppl": result.ppl,
        "quality": result.quality,
    }
    return write_experiment(
        path,
        payload,
        result.config.to_dict(),
        lambda directory: _plots(result.runs, directory),
        render_markdown,
    )


def format_ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def format_mib(num_bytes: float | None) -> str:
    return "n/a" if num_bytes is None else f"{num_bytes / 2**20:.1f}"


def _cell(summary: dict, scale=format_ms) -> str:
    return f"{scale(summary['median'])} ({scale(summary['min'])}–{scale(summary['max'])})"


def comparison_rows(payload: dict) -> list[str]:
    """One row per (dtype, prompt length, method), with optimized/baseline ratios on the optimized row."""
    rows = [
        "| dtype | batch | prompt | method | TTFT ms | TPOT ms | TPOT / floor | out tok/s | prefill tok/s "
        "| peak mem MiB | peak Δ MiB | KV MiB | TPOT ratio | TTFT ratio | KV ratio |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    runs = payload["runs"]
    by_key = {(r["dtype"], r["prompt_len"], r["method"]): r for r in runs}
    for r in runs:
        base = by_key.get((r["dtype"], r["prompt_len"], "baseline"))
        ratios = ["", "", ""]
        if r["method"] == "optimized" and base:
            ratios = [
                f"{r['tpot_s']['median'] / base['tpot_s']['median']:.2f}x",
                f"{r['ttft_s']['median'] / base['ttft_s']['median']:.2f}x",
                f"{r['kv_cache_bytes'] / base['kv_cache_bytes']:.2f}x" if base["kv_cache_bytes"] else "",
            ]
        rows.append(
            f"| {r['dtype']} | {r['batch_size']} | {r['prompt_len']} | {r['method']} | {_cell(r['ttft_s'])} "
            f"| {_cell(r['tpot_s'])} | {r['tpot_over_floor']:.2f}x | {r['output_tokens_per_s']['median']:.1f} "
            f"| {r['prefill_tokens_per_s']['median']:.0f} | {format_mib(r['peak_memory_bytes']['median'])} "
            f"| {format_mib(r['peak_memory_delta_bytes']['median'])} | {format_mib(r['kv_cache_bytes'])} | "
            + " | ".join(ratios)
            + " |"
        )
    return rows


def _forward_path(runs: list[dict]) -> str:
    paths = {r.get("forward_path", "hf") for r in runs if r["method"] == "optimized"}
    if paths == {"native"}:
        return "running the model's engine-native twin (kvlab/models, same weights) over a static K/V buffer"
    return "running the Hugging Face model's own modules"


def render_markdown(payload: dict, plots: list[str]) -> str:
    config, machine, model = payload["config"], payload["machine"], payload["model"]
    lines = [
        f"# {config['technique']} / {config['experiment_name']}",
        "",
        "Reproduce with:",
        "",
        f"    {payload['command']}",
        "",
        "## Machine",
        "",
        f"{machine['cpu']}, {machine['cores']} cores, {machine['torch_threads']} torch threads, {machine['ram_gib']} GiB RAM, "
        f"GPU: {machine['gpu'] or 'none'}; Python {machine['python']}, torch {machine['torch']}, "
        f"transformers {machine['transformers']}. Kernels: {machine.get('kernels', 'not recorded')}.",
        "",
        f"Model: `{model['name']}` ({model['source']}). Dataset: `{config['dataset']}`. Batch level: "
        f"{config['batch_level']} (batch {config['batch_size']}, prompts {config['prompt_lengths']}, "
        f"{config['new_tokens']} new tokens, greedy, fixed length). {config['warmup']} warm-up + {config['repeats']} "
        "measured runs per cell, baseline and optimized alternating; cells show median (min–max).",
        "",
        "Baseline: `model.generate()` (HF defaults, DynamicCache), TTFT/TPOT from a streamer's per-token timestamps. "
        f"Optimized: `kvlab.generate` with the technique's cache, {_forward_path(payload['runs'])}.",
        "",
        "## Baseline vs optimized",
        "",
        *comparison_rows(payload),
        "",
        "Ratios are optimized / baseline (below 1 = faster or smaller). Peak memory: "
        f"{payload['runs'][0]['memory_kind'] if payload['runs'] else ''}; peak Δ is the rise over the run's start "
        "(model weights excluded). KV MiB: exact bytes of the cache tensors at the end of generation.",
        "",
        "## The physical floor of batch-1 decode",
        "",
        "Each decode step must read every weight once, so TPOT >= weight bytes / memory bandwidth. The bandwidth "
        "is measured in this run by a 256 MiB matrix-vector product at the run's dtype.",
        "",
        "| dtype | weight MiB per token | bandwidth GB/s | floor TPOT ms |",
        "|---|---:|---:|---:|",
    ]
    for dtype, floor in payload["floors"].items():
        lines.append(
            f"| {dtype} | {format_mib(floor['weight_bytes_per_token'])} | {floor['bandwidth_bytes_per_s'] / 1e9:.2f} "
            f"| {format_ms(floor['floor_tpot_s'])} |"
        )
    if payload["agreement"]:
        lines += [
            "",
            "## Greedy agreement (same inputs)",
            "",
            "| dtype | prompt | identical | matching prefix |",
            "|---|---:|---|---:|",
        ]
        for a in payload["agreement"]:
            flag = "yes" if a["identical"] else "**NO**"
            lines.append(
                f"| {a['dtype']} | {a['prompt_len']} | {flag} | {a['matching_prefix']} / {a['new_tokens']} |"
            )
        if any(not a["identical"] and a["dtype"] == "float32" for a in payload["agreement"]):
            lines += [
                "",
                "**WARNING: in float32 the optimized path's greedy output differs from the baseline.**",
            ]
    if payload["ppl"]:
        ppl = payload["ppl"]
        lines += [
            "",
            "## Perplexity",
            "",
            f"PPL = **{ppl['ppl']:.3f}** over {ppl['tokens_scored']} tokens.",
            "",
            f"Protocol: {ppl['protocol']}",
        ]
        if not model["meaningful_ppl"]:
            lines += [
                "",
                "This model has random weights: its perplexity is meaningless (reported only to show the path runs).",
            ]
    quality = payload.get("quality")
    if quality:
        lines += [
            "",
            "## Quality under compression (same tokens)",
            "",
            "| cache | PPL | KV MiB |",
            "|---|---:|---:|",
            f"| full | {quality['full_ppl']:.3f} | {format_mib(quality['full_kv_bytes'])} |",
            f"| {config['technique']} | {quality['press_ppl']:.3f} | {format_mib(quality['press_kv_bytes'])} |",
            "",
            f"Protocol: {quality['protocol']}",
        ]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def _plots(runs: list[RunRecord], directory: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    series = sorted({(r.method, r.dtype) for r in runs})
    for metric, label, filename in [
        ("tpot_s", "TPOT (ms)", "tpot_vs_prompt.png"),
        ("ttft_s", "TTFT (ms)", "ttft_vs_prompt.png"),
    ]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, dtype in series:
            points = sorted(
                (r.prompt_len, getattr(r, metric).median * 1000)
                for r in runs
                if (r.method, r.dtype) == (method, dtype)
            )
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{method} {dtype}")
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(directory / filename, dpi=110)
        plt.close(fig)
        names.append(filename)
    longest = max(r.prompt_len for r in runs)
    chosen = [r for r in runs if r.prompt_len == longest]
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [f"{r.method}\n{r.dtype}" for r in chosen]
    x = range(len(chosen))
    ax.bar(
        [i - 0.2 for i in x],
        [r.peak_memory_delta_bytes.median / 2**20 for r in chosen],
        0.4,
        label="peak Δ MiB",
    )
    ax.bar([i + 0.2 for i in x], [r.kv_cache_bytes / 2**20 for r in chosen], 0.4, label="KV cache MiB")
    ax.set_xticks(list(x), labels)
    ax.set_title(f"memory at prompt {longest}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(directory / "memory.png", dpi=110)
    plt.close(fig)
    names.append("memory.png")
    return names


def _read_results(path: Path) -> dict:
    file = path / "results.json" if path.is_dir() else path
    try:
        payload = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read results from {file}: {error}") from None
    if payload.get("schema_version") != SCHEMA_VERSION:
        raise ConfigError(f"{file}: unsupported schema version {payload.get('schema_version')}")
    return payload


def compare(paths: list[Path]) -> str:
    """One Markdown table across experiments (each path: an experiment dir or its results.json)."""
    rows = [
        "| experiment | model | dtype | batch | prompt | method | TTFT ms | TPOT ms | TPOT ratio | KV MiB | PPL |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for path in paths:
        payload = _read_results(path)
        name = f"{payload['config']['technique']}/{payload['config']['experiment_name']}"
        ppl = f"{payload['ppl']['ppl']:.2f}" if payload.get("ppl") else ""
        base = {(r["dtype"], r["prompt_len"]): r for r in payload["runs"] if r["method"] == "baseline"}
        for r in payload["runs"]:
            b = base.get((r["dtype"], r["prompt_len"]))
            ratio = (
                f"{r['tpot_s']['median'] / b['tpot_s']['median']:.2f}x"
                if b and r["method"] != "baseline"
                else ""
            )
            rows.append(
                f"| {name} | {payload['model']['name']} | {r['dtype']} | {r['batch_size']} | {r['prompt_len']} | {r['method']} "
                f"| {format_ms(r['ttft_s']['median'])} | {format_ms(r['tpot_s']['median'])} | {ratio} | {format_mib(r['kv_cache_bytes'])} | {ppl} |"
            )
    return "\n".join(rows) + "\n"


def press_summary(paths: list[Path], prompt_len: int | None = None) -> str:
    """The per-method table: one row per press experiment, at one prompt length (default: each
    experiment's longest) and its first dtype; cells are baseline / optimized medians."""
    rows = [
        "| method | ratio | PPL protocol | PPL full | PPL press | TTFT ms | TPOT ms | out tok/s | peak RSS MiB | KV MiB |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for path in paths:
        payload = _read_results(path)
        config, quality = payload["config"], payload.get("quality") or {}
        press = config.get("press") or {}
        length = prompt_len or max(config["prompt_lengths"])
        dtype = config["dtypes"][0]
        by_method = {
            r["method"]: r for r in payload["runs"] if r["prompt_len"] == length and r["dtype"] == dtype
        }
        if set(by_method) != {"baseline", "optimized"}:
            raise ConfigError(f"{path}: no baseline and optimized runs at prompt {length}, {dtype}")
        base, opt = by_method["baseline"], by_method["optimized"]

        protocol = quality.get("protocol", "").split(":")[0].replace(" PPL", "")
        budget = press.get("compression_ratio", press.get("max_cache_tokens", ""))
        full, pressed = quality.get("full_ppl"), quality.get("press_ppl")
        rows.append(
            f"| {config['technique']} | {budget} | {protocol} "
            f"| {'' if full is None else f'{full:.3f}'} | {'' if pressed is None else f'{pressed:.3f}'} "
            f"| {_pair(base, opt, 'ttft_s', format_ms)} | {_pair(base, opt, 'tpot_s', format_ms)} "
            f"| {_pair(base, opt, 'output_tokens_per_s', lambda v: f'{v:.1f}')} "
            f"| {_pair(base, opt, 'peak_memory_bytes', format_mib)} "
            f"| {format_mib(base['kv_cache_bytes'])} / {format_mib(opt['kv_cache_bytes'])} |"
        )
    return "\n".join(rows) + "\n"


def _pair(base: dict, optimized: dict, key: str, fmt) -> str:
    return f"{fmt(base[key]['median'])} / {fmt(optimized[key]['median'])}"
