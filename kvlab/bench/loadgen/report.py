"""The serving bench's self-describing results in results/serving/<experiment>/: results.json (each
run's numbers, every request's record, the /metrics scraped before and after), config.yaml and
report.md with the issue's bar checked per run (met or missed, as measured)."""

from pathlib import Path
from typing import Any

from kvlab.bench.core.writer import SCHEMA_VERSION, write_experiment
from kvlab.bench.report.format import format_ms, title_lines


def checks(run: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's bar for one loaded run: (description, measured, met)."""
    agreement, idle, counted = run["agreement"], run["idle_after"], run["counters"]
    rows = [
        ("server errors (status != 200, broken streams)", str(run["errors"]), run["errors"] == 0),
        (
            "KV blocks in use after the run",
            f"{idle['kv_blocks_used']} of {idle['kv_blocks_total']}",
            idle["kv_blocks_used"] == 0,
        ),
        (
            "greedy outputs identical to the unloaded run",
            f"{agreement['identical']} / {run['completed']} completed"
            + (
                f"; {len(agreement['aborted_not_a_prefix'])} aborted not a prefix"
                if agreement["aborted_not_a_prefix"]
                else ""
            ),
            agreement["equal"],
        ),
        ("/metrics counters match the clients' counts", _counter_summary(counted), counted["match"]),
    ]
    if run["replicas"] > 1 or run["replicas_seen"]:
        seen = len(run["replicas_seen"])
        rows.append((f"replicas that answered (of {run['replicas']})", str(seen), seen == run["replicas"]))
    return [{"check": c, "measured": m, "met": bool(ok)} for c, m, ok in rows]


def write_load_report(payload: dict[str, Any], path: Path) -> Path:
    payload = {"schema_version": SCHEMA_VERSION, **payload}
    for run in payload["runs"]:
        run["checks"] = checks(run)
    payload["bar_met"] = all(c["met"] for run in payload["runs"] for c in run["checks"])
    return write_experiment(path, payload, payload["config"], lambda directory: [], render_markdown)


def render_markdown(payload: dict[str, Any], plots: list[str]) -> str:
    config, machine, load = payload["config"], payload["machine"], payload["config"]["load"]
    requests, server = payload["requests"], payload["server_config"]
    aborted = [r for r in requests if r["abort_after"] is not None]
    lines = [
        *title_lines(config, payload["command"]),
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']} GiB RAM, GPU: "
        f"{machine['gpu'] or 'none'}; torch {machine['torch']}, transformers {machine['transformers']}. "
        f"The clients, the server and (with Ray) every replica share this machine.",
        "",
        f"Server: `kvlab serve` as a subprocess (its own process and event loop), model `{server['model']}`, "
        f"{server['engine']['dtype']}, engine {_engine(server['engine'])}, {server['threads']} torch "
        f"thread(s){'' if config['threads'] else ' (every core but one: the clients need a core)'}. Requests: {len(requests)} greedy streaming completions "
        f"(seed {config['seed']}), prompts {_span(requests, 'prompt_len')} tokens of {payload['data']}, "
        f"max_tokens {_span(requests, 'max_tokens')}"
        f"{' with ignore_eos' if load['ignore_eos'] else ''}; {load['num_clients']} concurrent clients over "
        f"HTTP (httpx), each sending its next request when its last ended; {len(aborted)} request(s) "
        f"({load['abort_fraction']:.0%}) disconnected by their client after a seeded 1..max_tokens-1 chunks.",
        "",
        "## The bar",
        "",
        "| run | check | measured | met |",
        "|---|---|---|---|",
    ]
    for run in payload["runs"]:
        for check in run["checks"]:
            met = "yes" if check["met"] else "**NO (missed)**"
            lines.append(f"| {run['label']} | {check['check']} | {check['measured']} | {met} |")
    lines += [
        "",
        "## Throughput and latency",
        "",
        "Output tok/s and requests/s count completed requests (usage tokens) over the run's wall time; "
        "TTFT is from send to the first chunk with text (aborted requests included), TPOT (last text chunk "
        "- first) / (tokens - 1) and e2e over completed requests. The unloaded run sends the same requests "
        "one at a time, read to their end.",
        "",
        "| run | replicas | done | aborted | errors | wall s | output tok/s | req/s "
        "| TTFT ms p50 / p90 / p99 | TPOT ms p50 / p90 / p99 | e2e s p50 / p90 / p99 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
        _row("unloaded (one at a time)", "1", payload["reference"]),
        *(_row(run["label"], str(run["replicas"]), run) for run in payload["runs"]),
    ]
    lines += _scaling_lines(payload["runs"])
    lines += _metrics_lines(payload["runs"])
    return "\n".join(lines) + "\n"


def _row(label: str, replicas: str, run: dict[str, Any]) -> str:
    return (
        f"| {label} | {replicas} | {run['completed']} | {run['aborted']} | {run['errors']} | {run['wall_s']:.2f} "
        f"| {run['output_tokens_per_s']:.1f} | {run['requests_per_s']:.2f} | {_triple(run['ttft_s'], format_ms)} "
        f"| {_triple(run['tpot_s'], format_ms)} | {_triple(run['e2e_s'], lambda s: f'{s:.2f}')} |"
    )


def _triple(p: dict[str, float] | None, fmt) -> str:
    return "n/a" if p is None else " / ".join(fmt(p[k]) for k in ("p50", "p90", "p99"))


def _scaling_lines(runs: list[dict[str, Any]]) -> list[str]:
    ray = [run for run in runs if run["label"].startswith("Ray Serve")]
    if not ray:
        return []
    one = next((run for run in ray if run["replicas"] == 1), None)
    lines = [
        "",
        "## Ray Serve replicas",
        "",
        "Each replica is a Ray actor with its own engine and torch threads (`replica_cpus`), behind Ray's "
        "HTTP proxy; the same clients and requests as above. On one machine the replicas share its cores "
        "and memory bandwidth, so the gain from a second replica is bounded by what the first left idle.",
        "",
        "| replicas | output tok/s | req/s | vs 1 replica |",
        "|---:|---:|---:|---:|",
    ]
    for run in ray:
        ratio = f"{run['output_tokens_per_s'] / one['output_tokens_per_s']:.2f}x" if one else "n/a"
        lines.append(
            f"| {run['replicas']} | {run['output_tokens_per_s']:.1f} | {run['requests_per_s']:.2f} | {ratio} |"
        )
    return lines


def _metrics_lines(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "## /metrics",
        "",
        "Scraped before and after each run (every replica; parsed with `prometheus_client.parser`; all "
        "samples are in results.json under runs[].metrics). Server counts are after - before, summed over "
        "replicas; 'ended' = completed + aborted. A client that leaves after the server sent its last "
        "token is an abort to the client and a completion to the server, so only their sum must match.",
        "",
        "| run | answered 200 (server / clients) | ended | aborted | generated tokens (server >= received) "
        "| blocks used after | running after | idle after s |",
        "|---|---|---|---|---|---|---|---:|",
    ]
    for run in runs:
        s, c = run["counters"]["server"], run["counters"]["client"]
        idle = run["idle_after"]
        lines.append(
            f"| {run['label']} | {s['answered_200']} / {c['answered_200']} "
            f"| {s['completed'] + s['aborted']} / {c['completed'] + c['aborted']} | {s['aborted']} / {c['aborted']} "
            f"| {s['generated_tokens']} / {c['generated_tokens']} | {idle['kv_blocks_used']} of {idle['kv_blocks_total']} "
            f"| {idle['running_requests']} | {idle['wait_s']:.2f} |"
        )
    return lines


def _counter_summary(counted: dict[str, Any]) -> str:
    s, c = counted["server"], counted["client"]
    return (
        f"200s {s['answered_200']}/{c['answered_200']}, ended {s['completed'] + s['aborted']}/"
        f"{c['completed'] + c['aborted']}, tokens {s['generated_tokens']}>={c['generated_tokens']}"
    )


def _engine(engine: dict[str, Any]) -> str:
    shown = {k: v for k, v in engine.items() if k not in ("dtype", "device")}
    return ", ".join(f"{k}={v}" for k, v in shown.items()) or "defaults"


def _span(requests: list[dict[str, Any]], key: str) -> str:
    return f"{min(r[key] for r in requests)}–{max(r[key] for r in requests)}"
