"""`kvlab bench --technique serving`: the load generator against `kvlab serve` and Ray Serve replicas.

One experiment:
  1. `kvlab serve` starts as a subprocess on a free port (kvlab.bench.loadgen.launch).
  2. Warm-up: `num_clients` short requests at once (first-call costs stay out of the numbers).
  3. The unloaded run: every request alone, one after another, read to its end (the reference).
  4. The loaded run: `num_clients` concurrent streaming clients, the seeded aborts included; /metrics
     scraped before and, once the server is idle, after.
  5. With `ray_replicas: [1, 2, ...]`: steps 2 and 4 again against Ray Serve with each number of
     replicas (kvlab.scale.ray_serve), outputs compared with the same unloaded run.
"""

import asyncio
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from kvlab.bench.loadgen import counters, stats
from kvlab.bench.loadgen.client import RequestRecord, run_clients
from kvlab.bench.loadgen.config import LoadBenchConfig, LoadWorkload
from kvlab.bench.loadgen.launch import free_port, kvlab_serve
from kvlab.bench.loadgen.workload import LoadRequest, load_requests, load_token_ids

WARMUP_TOKENS = 4


def run_load_bench(config: LoadBenchConfig, out_dir: Path, command: str) -> Path:
    """Run the experiment and write results/serving/<experiment>/ (claim `out_dir` first)."""
    from kvlab.bench.loadgen.report import write_load_report

    payload = run_all(config)
    payload["command"] = command
    return write_load_report(payload, out_dir)


def run_all(config: LoadBenchConfig) -> dict[str, Any]:
    from kvlab.bench.core.machine import machine_info
    from kvlab.models.loader import load_tokenizer

    token_ids, data = load_token_ids(config, load_tokenizer(config.model))
    requests = load_requests(token_ids, config.load, config.seed)
    payload: dict[str, Any] = {
        "machine": machine_info("cpu" if config.device == "auto" else config.device),
        "config": config.to_dict(),
        "server_config": server_config(config),
        "data": data,
        "requests": [
            {"prompt_len": len(r.prompt_ids), "max_tokens": r.max_tokens, "abort_after": r.abort_after}
            for r in requests
        ],
    }
    with tempfile.TemporaryDirectory(prefix="kvlab-serve-") as workdir:
        _progress(f"starting kvlab serve --model {config.model}")
        with kvlab_serve(payload["server_config"], Path(workdir), config.startup_timeout_s) as url:
            model = served_model(url)
            warm_up(url, model, requests, config.load)
            _progress(f"unloaded run: {len(requests)} requests one at a time")
            reference = unloaded_run(url, model, requests, config.load)
            payload["reference"] = stats.summarize(*reference) | {
                "texts": [r.text for r in reference[0]],
                "errors_detail": [r.error for r in reference[0] if r.outcome != "completed"],
            }
            runs = [loaded_run(url, model, "kvlab serve", 1, None, requests, reference[0], config)]
    if config.ray_replicas:
        runs += ray_runs(config, payload["server_config"], requests, reference[0])
    payload["runs"] = runs
    return payload


def server_config(config: LoadBenchConfig) -> dict[str, Any]:
    """serve.yaml's keys for the servers under test (host and port are chosen at start).

    Torch threads of `kvlab serve`: `threads`, else every core but one. The clients run on the same
    machine and need a core; a server with a thread per core then waits at every OpenMP barrier for a
    thread the OS gave to a client (measured on 2 cores: SmolLM2's decode step 46 ms on 1 thread
    beside a busy process, 770 ms on 2)."""
    threads = config.threads or max(1, (os.cpu_count() or 1) - 1)
    engine = {**config.engine, "dtype": config.dtypes[0], "device": config.device}
    return {"model": config.model, "threads": threads, **config.server, "engine": engine}


def ray_runs(
    config: LoadBenchConfig, serve_config: dict, requests: list[LoadRequest], reference: list[RequestRecord]
) -> list[dict[str, Any]]:
    from kvlab.scale.cluster import ray_session
    from kvlab.scale.ray_serve import REPLICA_HEADER, serve_replicas

    runs = []
    with ray_session(config.ray_cpus):
        for num_replicas in config.ray_replicas:
            _progress(f"Ray Serve: {num_replicas} replica(s) of {config.replica_cpus} CPU(s)")
            with serve_replicas(serve_config, num_replicas, config.replica_cpus, port=free_port()) as url:
                model = served_model(url)
                warm_up(url, model, requests, config.load)
                label = f"Ray Serve, {num_replicas} replica{'s' if num_replicas > 1 else ''}"
                runs.append(
                    loaded_run(url, model, label, num_replicas, REPLICA_HEADER, requests, reference, config)
                )
    return runs


def served_model(url: str) -> str:
    import httpx

    return httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]


def warm_up(url: str, model: str, requests: list[LoadRequest], workload: LoadWorkload) -> None:
    """`num_clients` short requests at once: first-call costs (allocations, a replica's first batch)
    stay out of the measured runs."""
    short = [
        LoadRequest(i, requests[i % len(requests)].prompt_ids, WARMUP_TOKENS, None)
        for i in range(workload.num_clients)
    ]
    asyncio.run(run_clients(url, short, model, workload.num_clients, workload.request_timeout_s, True))


def unloaded_run(
    url: str, model: str, requests: list[LoadRequest], workload: LoadWorkload
) -> tuple[list[RequestRecord], float]:
    whole = [LoadRequest(r.index, r.prompt_ids, r.max_tokens, None) for r in requests]
    return asyncio.run(run_clients(url, whole, model, 1, workload.request_timeout_s, workload.ignore_eos))


def loaded_run(
    url: str,
    model: str,
    label: str,
    num_replicas: int,
    replica_header: str | None,
    requests: list[LoadRequest],
    reference: list[RequestRecord],
    config: LoadBenchConfig,
) -> dict[str, Any]:
    workload = config.load
    _progress(
        f"{label}: {workload.num_clients} clients, {len(requests)} requests, {workload.num_aborts} aborts"
    )
    before = counters.scrape_replicas(url, num_replicas, replica_header)
    records, wall_s = asyncio.run(
        run_clients(
            url,
            requests,
            model,
            workload.num_clients,
            workload.request_timeout_s,
            workload.ignore_eos,
            replica_header,
        )
    )
    after, idle_wait_s = counters.wait_idle(url, num_replicas, replica_header)
    return {
        "label": label,
        "replicas": num_replicas,
        **stats.summarize(records, wall_s),
        "replicas_seen": sorted({r.replica for r in records if r.replica}),
        "agreement": stats.agreement(records, reference),
        "idle_after": counters.idle_state(after) | {"wait_s": idle_wait_s},
        "counters": counters.compare(before, after, records),
        "metrics": {
            "before": {replica: s.to_dict() for replica, s in before.items()},
            "after": {replica: s.to_dict() for replica, s in after.items()},
        },
        "records": [record_dict(r) for r in records],
    }


def record_dict(record: RequestRecord) -> dict[str, Any]:
    return {
        "index": record.index,
        "outcome": record.outcome,
        "status": record.status,
        "start_s": record.start_s,
        "first_token_s": record.token_times_s[0] if record.token_times_s else None,
        "end_s": record.end_s,
        "num_tokens": record.num_tokens,
        "finish_reason": record.finish_reason,
        "replica": record.replica,
        "error": record.error,
    }


def _progress(message: str) -> None:
    print(f"kvlab: serving bench: {message}", file=sys.stderr, flush=True)
