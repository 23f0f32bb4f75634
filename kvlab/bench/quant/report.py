"""The quantization bench's report: results.json, config.yaml and report.md in
results/quantization/<experiment>/, with issue 12's bars as measured in this run."""

import statistics
from pathlib import Path
from typing import Any

from kvlab.bench.core.floor import Floor, mean_decode_context, round_bandwidth, round_over_floor
from kvlab.bench.core.writer import SCHEMA_VERSION, write_experiment
from kvlab.bench.report.format import bar, bars_table, format_mib, format_ms, title_lines

BASELINE = "baseline"
PPL_BAR = 0.005  # int8 weights, int8 KV: PPL at most +0.5% over float32's
TPOT_BARS = {"int8": 0.30, "int4-g128": 0.35}  # TPOT over float32 kvlab.generate's
INT4_BYTES_BAR = 0.18
KV_BYTES_BARS = {"kv-int8": 0.30, "kv-int4": 0.18}
RECOVERY_BAR = 0.30  # GPTQ / AWQ: share of the RTN int4-g128 -> float32 PPL gap recovered


def median_of(samples: list[dict], key: str) -> float:
    return statistics.median(s[key] for s in samples)


def bandwidth(payload: dict) -> tuple[str, float]:
    """(probe, bytes/s) of the floors: each timed round's best probe, median over the rounds (results
    written before the bench probed per round hold one set of probes)."""
    return round_bandwidth(payload.get("probe_rounds") or [payload["probes_bytes_per_s"]])


def issue_bars(payload: dict[str, Any]) -> list[dict[str, Any]]:
    methods, bars = payload["methods"], []
    speed = payload["speed"][0]["runs"]
    float_ppl = methods.get("float32", {}).get("ppl", {}).get("ppl")
    if "float32" in speed:
        float_tpot = median_of(speed["float32"], "tpot_s")
        for name, target in TPOT_BARS.items():
            if name in speed:
                bars.append(
                    bar(
                        f"{name}: TPOT / float32 TPOT",
                        "<=",
                        target,
                        median_of(speed[name], "tpot_s") / float_tpot,
                    )
                )
    if float_ppl and "int8" in methods:
        bars.append(
            bar(
                "int8: PPL rise over float32",
                "<=",
                PPL_BAR * 100,
                (methods["int8"]["ppl"]["ppl"] / float_ppl - 1) * 100,
                "%",
            )
        )
    full = payload["methods_baseline_weight_bytes"]
    if "int4-g128" in methods:
        bars.append(
            bar(
                "int4-g128: weight bytes / float32's",
                "<=",
                INT4_BYTES_BAR,
                methods["int4-g128"]["weight_bytes_per_token"] / full,
            )
        )
    rtn = methods.get("int4-g128", {}).get("ppl", {}).get("ppl")
    for name in ("gptq-int4-g128", "awq-int4-g128"):
        if name in methods and rtn and float_ppl and rtn > float_ppl:
            recovered = (rtn - methods[name]["ppl"]["ppl"]) / (rtn - float_ppl)
            bars.append(
                bar(f"{name}: share of the RTN -> float32 PPL gap recovered", ">=", RECOVERY_BAR, recovered)
            )
    for name, target in KV_BYTES_BARS.items():
        if name in methods:
            ppl = methods[name]["ppl"]
            bars.append(bar(f"{name}: KV bytes / float32 KV bytes", "<=", target, ppl["kv_bytes_ratio"]))
            if name == "kv-int8":
                bars.append(
                    bar(
                        "kv-int8: PPL rise over float32 (same chunked protocol)",
                        "<=",
                        PPL_BAR * 100,
                        (ppl["ppl"] / ppl["float32_ppl"] - 1) * 100,
                        "%",
                    )
                )
    for name, entry in methods.items():
        engine = entry.get("engine", {})
        if engine.get("checked") and entry["kind"] in ("weights", "gguf", "dtype") and name != "float32":
            bars.append(
                bar(f"{name}: engine greedy tokens = kvlab.generate's", ">=", 1.0, float(engine["identical"]))
            )
    return bars


def write_quant_report(payload: dict[str, Any], path: Path) -> Path:
    payload = {"schema_version": SCHEMA_VERSION, **payload}
    payload["bars"] = issue_bars(payload)
    return write_experiment(path, payload, payload["config"], lambda directory: [], render_markdown)


def render_markdown(payload: dict[str, Any], plots: list[str]) -> str:
    del plots
    config, machine, methods = payload["config"], payload["machine"], payload["methods"]
    probe, bytes_per_s = bandwidth(payload)
    full = payload["methods_baseline_weight_bytes"]
    lines = [
        *title_lines(config, payload["command"]),
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['torch_threads']} torch threads, "
        f"{machine['ram_gib']} GiB RAM; torch {machine['torch']}"
        f"{'; GPU ' + machine['gpu'] if payload.get('device') == 'cuda' else ''}. Kernels: {machine['kernels']}.",
        "",
        f"Model `{payload['model']['name']}` ({payload['model']['source']}). Baseline: float32 "
        "`model.generate()`; every method runs kvlab.generate on its own model, the same prompts "
        f"(wikitext-2 test windows), batch {config['batch_size']}, {config['new_tokens']} new tokens, median "
        f"of {config['repeats']} rounds after {config['warmup']} warm-up, methods interleaved round by round. "
        "Floor = (the method's weight bytes + its K/V bytes per position x the positions a timed step attends, "
        "prompt + new tokens / 2 per row) / the read bandwidth, probed before every timed round; TPOT / floor "
        "is the median over the rounds of each round's TPOT over its own round's floor (the round's best "
        f"probe; median over the rounds {bytes_per_s / 1e9:.1f} GB/s, best most often: {probe}).",
        "",
        "## Bars (issue 12)",
        "",
        *bars_table(payload["bars"]),
    ]
    if payload["skipped"]:
        lines += ["", *[f"Skipped {name}: {reason}." for name, reason in payload["skipped"].items()]]
    full_kv = payload.get("methods_baseline_kv_bytes_per_position", 0)
    for cell in payload["speed"]:
        lines += speed_section(cell, methods, full, full_kv, bytes_per_s)
    lines += ppl_section(methods)
    lines += kernel_section(payload.get("kernels", {}), bytes_per_s)
    return "\n".join(lines) + "\n"


def speed_section(cell: dict, methods: dict, full: int, full_kv: int, bytes_per_s: float) -> list[str]:
    runs = cell["runs"]
    float_tpot = median_of(runs["float32"], "tpot_s") if "float32" in runs else None
    lines = [
        "",
        f"## Speed and memory, prompt {cell['prompt_len']}",
        "",
        "| method | weights MiB | x float32 | TTFT ms | TPOT ms | x float32 TPOT | TPOT / floor | peak rise MiB | KV MiB | greedy = float32 (prefix) | forward |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, samples in runs.items():
        weight_bytes = full if name == BASELINE else methods[name]["weight_bytes_per_token"]
        kv_bytes = full_kv if name == BASELINE else methods[name].get("kv_bytes_per_position", 0)
        rows, new_tokens = len(samples[0]["tokens"]), len(samples[0]["tokens"][0])
        context = mean_decode_context(cell["prompt_len"], new_tokens)
        tpot = median_of(samples, "tpot_s")
        floor = Floor(weight_bytes, bytes_per_s, kv_bytes_per_position=kv_bytes)
        # each round's TPOT over its own round's floor, where the bench probed per round
        bandwidths = cell.get("round_bandwidths") or [bytes_per_s] * len(samples)
        over_floor = round_over_floor(
            [s["tpot_s"] for s in samples], [floor.at_bandwidth(b).tpot_at(context, rows) for b in bandwidths]
        )
        ratio = f"{tpot / float_tpot:.2f}x" if float_tpot else "n/a"
        label = "baseline: float32 `model.generate()`" if name == BASELINE else name
        lines.append(
            f"| {label} | {format_mib(weight_bytes)} | {weight_bytes / full:.3f} | "
            f"{format_ms(median_of(samples, 'ttft_s'))} | {format_ms(tpot)} | {ratio} | {over_floor:.2f}x"
            f"{' (below the floor: a measurement error)' if over_floor < 1 else ''} | "
            f"{format_mib(median_of(samples, 'peak_rise_bytes'))} | {format_mib(samples[0]['kv_cache_bytes'])} | "
            f"{cell['greedy_prefix_vs_float32'][name]} / {len(samples[0]['tokens'][0])} | {samples[0]['path']} |"
        )
    lines += [
        "",
        f"Peak rise: over the run's start ({runs[BASELINE][0]['memory_kind']}). Greedy prefix: tokens equal "
        "to float32 kvlab.generate's before the first difference (quantization changes the model, so some "
        "difference is expected; the engine check below compares like with like).",
    ]
    return lines


def ppl_section(methods: dict) -> list[str]:
    lines = [
        "",
        "## Quality",
        "",
        "| method | PPL | protocol | engine = kvlab.generate |",
        "|---|---:|---|---|",
    ]
    for name, entry in methods.items():
        ppl = entry.get("ppl", {})
        engine = entry.get("engine", {})
        if engine.get("checked"):
            check = (
                "identical" if engine["identical"] else f"differs after {engine['matching_prefix']} tokens"
            )
        else:
            check = engine.get("reason", "n/a")
        lines.append(f"| {name} | {ppl.get('ppl', float('nan')):.3f} | {ppl.get('protocol', '')} | {check} |")
    return lines


def kernel_section(kernels: dict, bytes_per_s: float) -> list[str]:
    if not kernels:
        return []
    lines = [
        "",
        "## Kernels: one pass over the quantized matrices at one row",
        "",
        "Every quantized matrix a decode step multiplies (the engine-native twin's fused q/k/v and "
        "gate/up, the LM head), one input row; median of passes after a warm-up. torch's kernels are "
        "its aten ops for int8 weight-only (per-channel) and grouped int4 (bfloat16 input), which "
        "torchao's CPU layouts call; error relative to a float64 product.",
        "",
        "| method | kernel | ms | GB/s | x floor | max rel. error |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for method, entry in kernels.items():
        floor = entry["bytes"] / bytes_per_s
        for kernel, seconds in entry["seconds"].items():
            lines.append(
                f"| {method} | {kernel} | {seconds * 1e3:.2f} | {entry['bytes'] / seconds / 1e9:.1f} | "
                f"{seconds / floor:.2f}x | {entry['max_relative_error'][kernel]:.1e} |"
            )
        for kernel, reason in entry["unavailable"].items():
            lines.append(f"| {method} | {kernel} | n/a | | | {reason} |")
    return lines
