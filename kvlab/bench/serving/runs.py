"""`kvlab bench --technique paged`: the serving engine against Hugging Face on identical requests.

One run measures, on one model and prompts cut from real text (seeded):
  mixed    a mix of prompt and output lengths, all arriving at t=0, ignore EOS: output tokens/s of
           the engine (continuous batching) vs HF static batching (`model.generate` on left-padded
           batches in arrival order, each batch running to its longest requested output; only each
           request's requested tokens count as output); the engine's TTFT/TPOT percentiles; KV
           blocks used vs allocated and peak memory of both.
  prefix   requests sharing a long system prompt, served one at a time: TTFT with and without the
           prefix cache (the first request, which fills the cache, is left out of both).
  decode   batch-1 TPOT of the engine, `model.generate` and `kvlab.generate` on the same prompt,
           per dtype, against the measured bandwidth floor (`kvlab.bench.core.floor`).
Config: defaults < configs/paged/<level>.yaml < --set < flags; validated before any model loads.
"""

import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from kvlab.bench.core.baselines import hf_static
from kvlab.bench.core.metrics import matching_prefix, paged_kv_bytes, same_round_ratios, tpot_between, tpot_s
from kvlab.bench.serving.config import ServingConfig
from kvlab.bench.serving.workloads import (
    BenchRequest,
    compression_requests,
    load_token_ids,
    mixed_requests,
    prefix_requests,
)
from kvlab.errors import ConfigError


def run_paged_bench(config: ServingConfig, out_dir: Path, command: str) -> Path:
    """Run every workload and write results/paged/<experiment>/ (claim `out_dir` first)."""
    from kvlab.bench.serving.report import write_serving_report

    if config.threads:
        torch.set_num_threads(config.threads)
    payload = run_all(config)
    payload["command"] = command
    return write_serving_report(payload, out_dir)


def run_all(config: ServingConfig) -> dict[str, Any]:
    """Every measurement of the paged bench; returns the results payload (raw samples included)."""
    from kvlab.bench.core.datasets import load_text
    from kvlab.bench.core.machine import machine_info, prepare_kernels
    from kvlab.bench.core.memory import model_resident_bytes
    from kvlab.engine.llm_engine import LLMEngine
    from kvlab.models.loader import load_model

    text = load_text(config.dataset, split=config.split, data_dir=config.data_dir)  # fails fast, no model yet
    prepare_kernels()  # a kernel build or calibration must never fall inside a measured time
    loaded = load_model(config.model, dtype=config.dtype, device=config.device, seed=config.seed)
    model_resident = model_resident_bytes(loaded.model)
    longest = config.longest_request()  # checked before loading for a registry model; here for any
    if longest > loaded.context_length:
        raise ConfigError(
            f"the workload needs {longest} tokens of context; {config.model} has {loaded.context_length}"
        )
    token_ids, data_description = load_token_ids(config, loaded.tokenizer, text)
    engine = LLMEngine.from_model(loaded, config.engine_config(config.dtype))
    payload: dict[str, Any] = {
        "machine": machine_info(loaded.model.device),
        "model": {"name": loaded.name, "source": loaded.source, "meaningful_ppl": loaded.meaningful_ppl},
        "data": data_description,
        "config": config.to_dict(),
        "engine_config": engine.config.to_dict(),
        "model_resident_bytes": model_resident,  # live memory after the model loaded, before the pool
    }
    requests = mixed_requests(token_ids, config.mixed, config.seed)
    _progress(f"mixed workload: {len(requests)} requests on the engine, then HF static batching")
    payload["mixed"] = measure_mixed(loaded, engine, requests, config)
    _progress(f"shared prefix: {config.prefix.num_requests} requests, without then with the prefix cache")
    payload["prefix"] = measure_prefix(engine, prefix_requests(token_ids, config.prefix, config.seed))
    if config.compression.enabled:
        workload = config.compression
        _progress(f"compression: {workload.num_requests} requests, without then with {workload.press}")
        requests = compression_requests(token_ids, workload, config.seed)
        payload["compression"] = measure_compression(loaded, engine, requests, workload)
    _progress(f"step profile: 1 and {engine.config.max_num_seqs} concurrent requests under torch's profiler")
    payload["step_profile"] = measure_step_profile(engine, token_ids, config)
    _progress(f"batch-1 decode in {', '.join(config.dtypes)}: engine, kvlab.generate, model.generate")
    payload["decode"] = measure_decode(config, token_ids, {config.dtype: (loaded, engine)})
    return payload


def measure_step_profile(engine, token_ids: list[int], config: ServingConfig) -> dict[str, Any]:
    """Where the engine's step time goes at batch 1 and at the engine's concurrency (max_num_seqs
    requests of the decode workload's first prompt length, all at t=0)."""
    from kvlab.bench.serving.step_profile import profile_steps

    workload = config.decode
    width = workload.prompt_lens[0]
    concurrency = engine.config.max_num_seqs
    if len(token_ids) < width * concurrency:
        raise ConfigError(
            f"the step profile needs {width * concurrency} tokens of text ({concurrency} prompts of "
            f"{width}); the dataset gave {len(token_ids)}"
        )
    prompts = [token_ids[i * width : (i + 1) * width] for i in range(concurrency)]
    serve(with_changes(engine), [BenchRequest(prompts[0][:16], 4)])  # warm-up, outside the profile
    return {
        str(n): profile_steps(
            with_changes(engine, enable_prefix_caching=False), prompts[:n], workload.new_tokens
        )
        for n in sorted({1, concurrency})
    }


def measure_mixed(loaded, engine, requests: list[BenchRequest], config: ServingConfig) -> dict[str, Any]:
    device = loaded.model.device
    warm = [BenchRequest(requests[0].prompt_ids[:16], 4)]
    serve(with_changes(engine), warm)
    hf_static(loaded, warm, 1)
    engine_runs, hf_runs = [], []
    for _ in range(config.mixed.repeats):
        with _peak_memory(device, config.benchmark_memory) as engine_peak:
            engine_run = serve(with_changes(engine), requests)
        engine_runs.append(engine_run | _peak_fields(engine_peak))  # the peak is known on exit
        with _peak_memory(device, config.benchmark_memory) as hf_peak:
            hf_run = hf_static(loaded, requests, config.mixed.hf_batch_size)
        hf_runs.append(hf_run | _peak_fields(hf_peak))
    # Report each path's median round by wall time; every round's wall time is kept.
    engine_run, hf_run = _median_run(engine_runs), _median_run(hf_runs)
    useful = sum(r.output_len for r in requests)
    pool_bytes = engine.runner.kv_cache_bytes
    num_blocks = engine.scheduler.kv.num_blocks
    engine_run |= {
        "output_tokens_per_s": useful / engine_run["wall_s"],
        "num_blocks": num_blocks,
        "block_size": engine.config.block_size,
        "kv_pool_bytes": pool_bytes,
        "peak_kv_bytes_in_use": paged_kv_bytes(max(engine_run["used_blocks"]), pool_bytes, num_blocks),
    }
    hf_run |= {
        "output_tokens_per_s": useful / hf_run["wall_s"],
    }
    engine_tokens, hf_tokens = engine_run.pop("tokens"), hf_run.pop("tokens")
    return {
        "requests": [{"prompt_len": len(r.prompt_ids), "output_len": r.output_len} for r in requests],
        "useful_output_tokens": useful,
        "engine": engine_run,
        "hf_static": hf_run,
        "agreement": agreement(engine_tokens, hf_tokens),
        "engine_tokens": engine_tokens,
    }


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda run: run["wall_s"])
    return ordered[(len(ordered) - 1) // 2] | {"wall_s_rounds": [run["wall_s"] for run in runs]}


def _progress(message: str) -> None:
    print(f"kvlab: paged bench: {message}", file=sys.stderr, flush=True)


def _peak_memory(device: torch.device, enabled: bool):
    from kvlab.bench.core.memory import PeakMemory

    return PeakMemory(device) if enabled else contextlib.nullcontext()


def _peak_fields(peak) -> dict[str, Any]:
    """Peak memory of a region; None values when benchmark_memory is off."""
    if peak is None:
        return {"peak_memory_bytes": None, "peak_memory_delta_bytes": None, "memory_kind": "not measured"}
    return {"peak_memory_bytes": peak.bytes, "peak_memory_delta_bytes": peak.delta, "memory_kind": peak.kind}


def serve(engine, requests: list[BenchRequest], press=None) -> dict[str, Any]:
    """All requests arrive at t=0; records each request's first and last token time and, after every
    step, the blocks in use and the tokens they hold. `press`: a RequestPress every request carries."""
    from kvlab.engine.request import SamplingParams

    pool, scheduler = engine.scheduler.kv.pool, engine.scheduler
    start = time.perf_counter()
    ids = [
        engine.add_request(
            r.prompt_ids, SamplingParams(max_tokens=r.output_len, ignore_eos=True), press=press
        )
        for r in requests
    ]
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    tokens: dict[str, list[int]] = {}
    used_blocks, stored_tokens = [], []
    while engine.has_unfinished_requests():
        outputs = engine.step()
        elapsed = time.perf_counter() - start
        used_blocks.append(pool.num_used_blocks)
        stored_tokens.append(sum(r.num_cached_tokens for r in scheduler.running))
        for output in outputs:
            first.setdefault(output.request_id, elapsed)
            last[output.request_id] = elapsed
            if output.finished:
                tokens[output.request_id] = output.output_token_ids
    wall = time.perf_counter() - start
    stats = engine.get_stats()
    return {
        "wall_s": wall,
        "ttft_s": [first[i] for i in ids],
        "tpot_s": [tpot_between(first[i], last[i], len(tokens[i])) for i in ids],
        "used_blocks": used_blocks,
        "stored_tokens": stored_tokens,
        "num_preemptions": stats.num_preemptions,
        "tokens": [tokens[i] for i in ids],
    }


def agreement(engine_tokens: list[list[int]], hf_tokens: list[list[int]]) -> dict[str, Any]:
    prefixes = [matching_prefix(a, b) for a, b in zip(engine_tokens, hf_tokens, strict=True)]
    identical = sum(a == b for a, b in zip(engine_tokens, hf_tokens, strict=True))
    return {"identical_requests": identical, "num_requests": len(prefixes), "matching_prefix": prefixes}


def measure_compression(loaded, engine, requests: list[BenchRequest], workload) -> dict[str, Any]:
    """The engine without and with the press on the same requests (fresh pool each), plus the first
    request through the HF path's PressCache, whose greedy tokens the engine's must equal."""
    from kvlab.engine.compression import RequestPress
    from kvlab.generate import generate
    from kvlab.press import get_press
    from kvlab.press.hf import PressCache

    press = get_press(workload.press)
    pool_bytes, num_blocks = engine.runner.kv_cache_bytes, engine.scheduler.kv.num_blocks
    result: dict[str, Any] = {"press_name": press.describe(), "max_cache_tokens": workload.max_cache_tokens}
    for label, request_press in (
        ("full", None),
        ("compressed", RequestPress(press, max_cache_tokens=workload.max_cache_tokens)),
    ):
        run = serve(with_changes(engine), requests, press=request_press)
        result[label] = run | {
            "output_tokens_per_s": sum(len(tokens) for tokens in run["tokens"]) / run["wall_s"],
            "peak_kv_bytes_in_use": paged_kv_bytes(max(run["used_blocks"]), pool_bytes, num_blocks),
        }
    cache = PressCache(press, loaded.model, max_cache_tokens=workload.max_cache_tokens)
    with cache.hooks(loaded.model):
        hf = generate(
            loaded.model,
            torch.tensor([requests[0].prompt_ids], device=loaded.model.device),
            workload.output_len,
            cache=cache,
        )
    result["hf_press_tokens"] = hf.tokens[0].tolist()
    result["engine_matches_hf_press"] = result["compressed"]["tokens"][0] == result["hf_press_tokens"]
    return result


def measure_prefix(engine, requests: list[BenchRequest]) -> dict[str, Any]:
    """One request at a time (TTFT is then prefill latency, not queueing), without then with the cache."""
    result: dict[str, Any] = {"prompt_len": len(requests[0].prompt_ids), "num_requests": len(requests)}
    for label, caching in (("without_cache", False), ("with_cache", True)):
        fresh = with_changes(engine, enable_prefix_caching=caching)
        ttfts = [serve(fresh, [request])["ttft_s"][0] for request in requests]
        result[label] = {"ttft_s": ttfts, "hit_rate": fresh.get_stats().prefix_cache_hit_rate}
    return result


def measure_decode(config: ServingConfig, token_ids: list[int], loaded_by_dtype: dict) -> dict[str, Any]:
    """Batch-1 TPOT of three paths on one prompt per length, per dtype. Every dtype's model and engine
    stay loaded and each round runs every dtype's paths in turn: dtypes measured one after the other
    can land in different spells of a VM's memory speed, so their ratio is taken round by round
    (`dtype_ratios`), as in the generation bench (kvlab.bench.generate.runner)."""
    from kvlab.bench.core.floor import (
        best_probe,
        floor_of_rounds,
        mean_decode_context,
        probe_round,
        probed_run,
    )
    from kvlab.engine.llm_engine import LLMEngine
    from kvlab.models.loader import load_model

    workload = config.decode
    models = {}
    for dtype in config.dtypes:
        if dtype in loaded_by_dtype:
            models[dtype] = loaded_by_dtype[dtype]
        else:
            loaded = load_model(config.model, dtype=dtype, device=config.device, seed=config.seed)
            models[dtype] = (loaded, LLMEngine.from_model(loaded, config.engine_config(dtype)))
    by_prompt = {}
    for prompt_len in workload.prompt_lens:
        prompt = token_ids[:prompt_len]
        paths = {dtype: decode_paths(*models[dtype], prompt, workload.new_tokens) for dtype in models}
        samples = {dtype: {name: [] for name in paths[dtype]} for dtype in models}
        # Each timed run between two probe rounds, measured again if the memory changed speed
        # during it (kvlab.bench.core.floor.probed_run); each path's run against its own probes.
        probe_rounds = {dtype: [] for dtype in models}
        bandwidths = {dtype: {name: [] for name in paths[dtype]} for dtype in models}
        remeasured = dict.fromkeys(models, 0)
        for round_index in range(workload.warmup + workload.repeats):
            for dtype, (loaded, _) in models.items():
                for name, run in paths[dtype].items():
                    if round_index < workload.warmup:
                        run()
                        continue
                    probed = probed_run(loaded.model, run, probe=probe_round)
                    samples[dtype][name].append(tpot_s(probed.result))
                    probe_rounds[dtype].append(probed.probes)
                    bandwidths[dtype][name].append(best_probe(probed.probes))
                    remeasured[dtype] += probed.attempts > 1
        context = mean_decode_context(len(prompt), workload.new_tokens)
        by_prompt[str(prompt_len)] = {}
        for dtype, (loaded, _) in models.items():
            floor = replace(
                floor_of_rounds(loaded.model, probe_rounds[dtype]), remeasured_runs=remeasured[dtype]
            )
            round_floors = {
                name: [floor.at_bandwidth(b).tpot_at(context) for b in path_bandwidths]
                for name, path_bandwidths in bandwidths[dtype].items()
            }
            by_prompt[str(prompt_len)][dtype] = floor.to_dict() | {
                "decode_floor_tpot_s": statistics.median(
                    f for floors in round_floors.values() for f in floors
                ),
                "round_decode_floor_tpot_s": round_floors,
                "tpot_s": samples[dtype],
            }
    return {
        "new_tokens": workload.new_tokens,
        "prompt_lens": list(workload.prompt_lens),
        "by_prompt": by_prompt,
        "dtype_ratios": decode_dtype_ratios(by_prompt, config.dtypes[0]),
    }


def decode_dtype_ratios(by_prompt: dict[str, dict], reference: str) -> list[dict[str, Any]]:
    """Per prompt length, other dtype and path: TPOT over `reference`'s, the median over the rounds of
    that round's ratio (sample i of every dtype and path ran in round i)."""
    ratios = []
    for prompt_len, by_dtype in by_prompt.items():
        for dtype, run in by_dtype.items():
            if dtype == reference:
                continue
            for path, times in run["tpot_s"].items():
                base = by_dtype[reference]["tpot_s"][path]
                rounds = same_round_ratios(times, base)
                ratios.append(
                    {
                        "prompt_len": int(prompt_len),
                        "dtype": dtype,
                        "reference": reference,
                        "path": path,
                        "tpot_ratio": statistics.median(rounds),
                        "round_ratios": rounds,
                    }
                )
    return ratios


def decode_paths(loaded, engine, prompt: list[int], new_tokens: int) -> dict[str, Callable[[], list[float]]]:
    """Per path, a call that decodes `new_tokens` after `prompt` and returns each token's time."""
    from kvlab.bench.core.baselines import run_baseline
    from kvlab.generate import generate

    input_ids = torch.tensor([prompt], device=loaded.model.device)
    return {
        "model.generate": lambda: run_baseline(loaded, input_ids, new_tokens)[0],
        "kvlab.generate": lambda: generate(loaded.model, input_ids, new_tokens).token_times,
        "engine": lambda: serve_times(with_changes(engine, enable_prefix_caching=False), prompt, new_tokens),
    }


def serve_times(engine, prompt: list[int], new_tokens: int) -> list[float]:
    """Seconds from submission to each token of one request on the engine."""
    from kvlab.engine.request import SamplingParams

    start = time.perf_counter()
    engine.add_request(prompt, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    times = []
    while engine.has_unfinished_requests():
        if engine.step():
            times.append(time.perf_counter() - start)
    return times


def with_changes(engine, **changes: Any):
    """A fresh engine (new scheduler, empty pool, zeroed stats) sharing `engine`'s model and KV tensors."""
    from kvlab.engine.llm_engine import LLMEngine
    from kvlab.engine.scheduler import Scheduler

    config = replace(engine.config, **changes)
    return LLMEngine(
        config,
        Scheduler(config, engine.scheduler.kv.num_blocks),
        engine.runner,
        engine.tokenizer,
        engine.eos_token_id,
        vocab_size=engine.vocab_size,
    )
