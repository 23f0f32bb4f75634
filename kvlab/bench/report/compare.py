"""Tables across experiments: `kvlab report compare` and the per-method press table (`kvlab report presses`)."""

from pathlib import Path

from kvlab.bench.core.writer import read_results
from kvlab.bench.report.format import format_mib, format_ms
from kvlab.errors import ConfigError


def compare(paths: list[Path]) -> str:
    """One Markdown table across experiments (each path: an experiment dir or its results.json)."""
    rows = [
        "| experiment | model | dtype | batch | prompt | method | TTFT ms | TPOT ms | TPOT ratio | KV MiB | PPL |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for path in paths:
        payload = read_results(path)
        name = f"{payload['config']['technique']}/{payload['config']['experiment_name']}"
        measured = payload.get("ppl") or {}
        base = {(r["dtype"], r["prompt_len"]): r for r in payload["runs"] if r["method"] == "baseline"}
        for r in payload["runs"]:
            # The PPL was measured at one dtype (the first; results before it was recorded: float32 only
            # if that was the first), so only that dtype's rows show it.
            ppl_dtype = measured.get("dtype", payload["config"]["dtypes"][0])
            ppl = f"{measured['ppl']:.2f}" if measured and r["dtype"] == ppl_dtype else ""
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
        "| method | ratio | PPL protocol | PPL full | PPL press | TTFT ms | TPOT ms | out tok/s | peak MiB "
        "| peak rise over model MiB | KV MiB |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for path in paths:
        payload = read_results(path)
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
            f"| {_pair(base, opt, 'peak_memory_rise_bytes', format_mib)} "
            f"| {format_mib(base['kv_cache_bytes'])} / {format_mib(opt['kv_cache_bytes'])} |"
        )
    return "\n".join(rows) + "\n"


def _pair(base: dict, optimized: dict, key: str, fmt) -> str:
    """`baseline / optimized` medians; n/a where a result predates the key."""

    def median(run: dict) -> str:
        return fmt(run[key]["median"]) if run.get(key) else "n/a"

    return f"{median(base)} / {median(optimized)}"
