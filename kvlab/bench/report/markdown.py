"""The generation bench's report: results.json (versioned, raw samples), config.yaml, report.md and
plots of one experiment, written by the one results writer (`kvlab.bench.core.writer`)."""

import dataclasses
from pathlib import Path

from kvlab.bench.core.machine import machine_info
from kvlab.bench.core.writer import SCHEMA_VERSION, write_experiment
from kvlab.bench.generate.runner import BenchResult
from kvlab.bench.report.floor import below_floor_warning, floor_lines, over_floor
from kvlab.bench.report.format import format_mib, format_ms, title_lines
from kvlab.bench.report.plots import generation_plots
from kvlab.models.loader import resolve_device


def write_report(result: BenchResult, path: Path, command: str) -> Path:
    payload = {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "machine": result.machine or machine_info(resolve_device(result.config.device)),
        "model": {
            "name": result.model_name,
            "source": result.model_source,
            "meaningful_ppl": result.meaningful_ppl,
        },
        "config": result.config.to_dict(),
        "floors": {dtype: floor.to_dict() for dtype, floor in result.floors.items()},
        "model_resident_bytes": result.model_resident_bytes,
        "runs": [dataclasses.asdict(run) for run in result.runs],
        "agreement": [dataclasses.asdict(a) for a in result.agreement],
        "dtype_ratios": [dataclasses.asdict(r) for r in result.dtype_ratios],
        "ppl": result.ppl,
        "quality": result.quality,
    }
    return write_experiment(
        path,
        payload,
        result.config.to_dict(),
        lambda directory: generation_plots(result.runs, directory),
        render_markdown,
    )


def _cell(summary: dict, scale=format_ms) -> str:
    return f"{scale(summary['median'])} ({scale(summary['min'])}–{scale(summary['max'])})"


def comparison_rows(payload: dict) -> list[str]:
    """One row per (dtype, prompt length, method), with optimized/baseline ratios on the optimized row."""
    rows = [
        "| dtype | batch | prompt | method | TTFT ms | TPOT ms | floor ms | TPOT / floor | out tok/s | prefill tok/s "
        "| peak MiB | rise over model MiB | rise over start MiB | KV MiB | TPOT ratio | TTFT ratio | KV ratio |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
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
            f"| {_cell(r['tpot_s'])} | {format_ms(r['floor_tpot_s']) if r.get('floor_tpot_s') else 'n/a'} | {over_floor(r['tpot_over_floor'])} | {r['output_tokens_per_s']['median']:.1f} "
            f"| {r['prefill_tokens_per_s']['median']:.0f} | {format_mib(r['peak_memory_bytes']['median'])} "
            f"| {format_mib((r.get('peak_memory_rise_bytes') or {}).get('median'))} "
            f"| {format_mib(r['peak_memory_delta_bytes']['median'])} | {format_mib(r['kv_cache_bytes'])} | "
            + " | ".join(ratios)
            + " |"
        )
    return rows


def _resident(payload: dict) -> str:
    resident = payload.get("model_resident_bytes") or {}
    values = set(resident.values())
    if len(resident) > 1 and len(values) == 1:  # every dtype's model loaded at once (runner.run)
        return f"{format_mib(values.pop())} MiB with the {' and '.join(resident)} models loaded"
    return (
        ", ".join(f"{dtype} {format_mib(value)} MiB" for dtype, value in resident.items()) or "not recorded"
    )


def dtype_ratio_lines(payload: dict) -> list[str]:
    """Each dtype's TPOT over the first dtype's, from runs of the same rounds."""
    ratios = payload.get("dtype_ratios") or []
    if not ratios:
        return []
    reference = ratios[0]["reference"]
    lines = [
        "",
        f"## Dtypes side by side (TPOT / {reference} TPOT)",
        "",
        "Every dtype's model stays loaded and each round runs each method at every dtype back to back (a "
        "bandwidth probe apart), so the two runs of a ratio mostly meet the same spell of the memory's speed. "
        "Each cell is the median over the rounds of that round's ratio (min–max).",
        "",
        "| dtype | prompt | method | TPOT / " + reference + " TPOT |",
        "|---|---:|---|---:|",
    ]
    for r in ratios:
        rounds = r["round_ratios"]
        lines.append(
            f"| {r['dtype']} | {r['prompt_len']} | {r['method']} | {r['tpot_ratio']:.2f}x "
            f"({min(rounds):.2f}–{max(rounds):.2f}) |"
        )
    return lines


def _forward_path(runs: list[dict], press: bool) -> str:
    paths = {r.get("forward_path", "hf") for r in runs if r["method"] == "optimized"}
    if paths == {"native"}:
        cache = (
            "with the press compressing each layer's K/V buffer (kvlab/native_press.py)"
            if press
            else "over a static K/V buffer"
        )
        return f"running the model's engine-native twin (kvlab/models, same weights) {cache}"
    return "running the Hugging Face model's own modules"


def render_markdown(payload: dict, plots: list[str]) -> str:
    config, machine, model = payload["config"], payload["machine"], payload["model"]
    lines = [
        *title_lines(config, payload["command"]),
        "## Machine",
        "",
        f"{machine['cpu']}, {machine['cores']} cores, {machine['torch_threads']} torch threads, {machine['ram_gib']} GiB RAM, "
        f"GPU: {machine['gpu'] or 'none'}; Python {machine['python']}, torch {machine['torch']}, "
        f"transformers {machine['transformers']}. Kernels: {machine.get('kernels', 'not recorded')}.",
        "",
        f"Model: `{model['name']}` ({model['source']}). Dataset: `{config['dataset']}`. Batch level: "
        f"{config['batch_level']} (batch {config['batch_size']}, prompts {config['prompt_lengths']}, "
        f"{config['new_tokens']} new tokens, greedy, fixed length). {config['warmup']} warm-up + {config['repeats']} "
        "measured runs per cell, in rounds that run the baseline at every dtype, then the optimized path; "
        "cells show median (min–max).",
        "",
        "Baseline: `model.generate()` (HF defaults, DynamicCache), TTFT/TPOT from a streamer's per-token timestamps. "
        f"Optimized: `kvlab.generate` with the technique's cache, {_forward_path(payload['runs'], bool(config.get('press')))}.",
        "",
        "## Baseline vs optimized",
        "",
        *comparison_rows(payload),
        "",
        "Ratios are optimized / baseline (below 1 = faster or smaller). Peak memory, per run: "
        f"{payload['runs'][0]['memory_kind'] if payload['runs'] else ''}. Rise over model: the run's peak "
        f"minus the live memory right after the models loaded ({_resident(payload)}); rise over start: minus "
        "the live memory when the run began. KV MiB: exact bytes of the cache tensors at the end of generation.",
        *below_floor_warning(
            [
                (f"{r['dtype']} prompt {r['prompt_len']} {r['method']}", r["tpot_over_floor"])
                for r in payload["runs"]
            ]
        ),
        *dtype_ratio_lines(payload),
        "",
        *floor_lines(payload["floors"]),
    ]
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
            f"PPL = **{ppl['ppl']:.3f}** over {ppl['tokens_scored']} tokens"
            + (f", of the {ppl['dtype']} model." if ppl.get("dtype") else "."),
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
