"""The quantization bench's measurements, all in one process on one machine:

- speed: float32 `model.generate()` (the baseline) and kvlab.generate on every method's model, on the
  same prompts, rounds interleaved method by method so that a busy spell of the machine hits all alike;
  TTFT, TPOT, peak memory, KV bytes; TPOT over each method's own floor (its weight and K/V bytes per
  token over the read bandwidth probed at the start of the same round);
- quality: wikitext-2 test PPL by the sliding-window protocol, every method on the same tokens (KV
  methods by feeding the windows in chunks through their quantized cache, with float32 the same way);
- agreement: each method's greedy tokens against float32's, and the paged engine's against
  kvlab.generate's on the same quantized model;
- kernels: one pass over every weight matrix at one row, kvlab's quantized GEMM against torch's own
  int8 / int4 CPU kernels (the aten ops torchao's CPU layouts call) where the format allows them.
"""

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kvlab.bench.core.baselines import run_baseline
from kvlab.bench.core.datasets import load_text
from kvlab.bench.core.floor import (
    ROUND_ITERS,
    bandwidth_probes,
    best_probe,
    decode_weight_bytes,
    kv_bytes_per_position,
    kv_shape,
    probe_medians,
)
from kvlab.bench.core.machine import machine_info, prepare_kernels
from kvlab.bench.core.memory import PeakMemory, model_resident_bytes
from kvlab.bench.core.metrics import matching_prefix, tpot_s, ttft_s
from kvlab.bench.eval.kv_quant_ppl import chunked_cache_ppl
from kvlab.bench.eval.perplexity import bench_perplexity, tokenize
from kvlab.bench.generate.runner import make_inputs
from kvlab.bench.quant.config import QuantBenchConfig
from kvlab.bench.quant.kernels import compare_kernels
from kvlab.bench.quant.report import write_quant_report
from kvlab.engine.request import SamplingParams
from kvlab.generate import generate
from kvlab.models.loader import LoadedModel, load_model, resolve_device
from kvlab.quant import paged_kv
from kvlab.quant.kv_quant import KVQuantSpec
from kvlab.quant.methods import Method, build_variant, parse_method

BASELINE = "baseline"


def run_quant_bench(config: QuantBenchConfig, out_dir: Path, command: str) -> Path:
    device = resolve_device(config.device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    if device.type == "cpu":
        prepare_kernels()
    methods = [parse_method(name) for name in config.methods]
    skipped = {
        m.name: "bitsandbytes needs CUDA; this run is on the CPU"
        for m in methods
        if m.needs_cuda and device.type != "cuda"
    }
    for name, reason in skipped.items():
        print(f"kvlab: quantization bench: skipping {name}: {reason}", flush=True)
    methods = [m for m in methods if m.name not in skipped]
    loaded = load_model(config.model, dtype="float32", device=config.device, seed=config.seed)
    resident = model_resident_bytes(loaded.model)
    text = load_text(config.dataset, split=config.split, data_dir=config.data_dir)
    tokens = tokenize(loaded.tokenizer, text.text)

    def load(dtype: str):
        return load_model(config.model, dtype=dtype, device=config.device, seed=config.seed).model

    variants, build_seconds = {}, {}
    for method in methods:
        print(f"kvlab: quantization bench: building {method.name}", flush=True)
        start = time.perf_counter()
        variants[method.name] = build_variant(method, loaded.model, load, config)
        build_seconds[method.name] = time.perf_counter() - start
    payload: dict[str, Any] = {
        "command": command,
        "machine": machine_info(device),
        "device": device.type,
        "model": {"name": loaded.name, "source": loaded.source, "meaningful_ppl": loaded.meaningful_ppl},
        "config": config.to_dict(),
        "skipped": skipped,
        "probe_rounds": [],  # the read bandwidth before every timed round (measure_speed)
        "model_resident_bytes": resident,
        "methods": {},
        "speed": [],
    }
    for method in methods:
        model = variants[method.name]
        payload["methods"][method.name] = {
            "kind": method.kind,
            "weight_bytes_per_token": decode_weight_bytes(model),
            "kv_bytes_per_position": method_kv_bytes_per_position(method, model),
            "build_s": build_seconds[method.name],
            "forward": generate_kwargs(method).get("path", "auto"),
        }
    payload["methods_baseline_weight_bytes"] = decode_weight_bytes(loaded.model)
    payload["methods_baseline_kv_bytes_per_position"] = kv_bytes_per_position(loaded.model)
    with torch.inference_mode():
        for prompt_len in config.prompt_lengths:
            payload["speed"].append(
                measure_speed(
                    config, loaded, variants, methods, tokens[0], prompt_len, device, payload["probe_rounds"]
                )
            )
    payload["probes_bytes_per_s"] = probe_medians(payload["probe_rounds"])
    for method in methods:
        print(f"kvlab: quantization bench: PPL of {method.name}", flush=True)
        payload["methods"][method.name]["ppl"] = measure_ppl(
            config, loaded, variants[method.name], method, text, tokens
        )
        payload["methods"][method.name]["engine"] = engine_agreement(
            config, loaded, variants[method.name], method, tokens[0]
        )
    # The kernel comparison times kvlab's CPU kernels against torch's; a CUDA run has none of them.
    payload["kernels"] = {}
    if device.type == "cpu":
        print("kvlab: quantization bench: kernels", flush=True)
        quantized = {m.name: variants[m.name] for m in methods if m.kind in ("weights", "gguf")}
        payload["kernels"] = compare_kernels(quantized, config.kernel_repeats)
    return write_quant_report(payload, out_dir)


def method_kv_bytes_per_position(method: Method, model) -> int:
    """K/V bytes a decode step reads per attended position: the model's dtype, or a quantized cache's
    codes and scales (a lower bound there: its newest tokens wait in full precision)."""
    if method.kind != "kv":
        return kv_bytes_per_position(model)
    return paged_kv.bytes_per_token(KVQuantSpec(bits=method.kv_bits), *kv_shape(model.config))


def generate_kwargs(method: Method) -> dict[str, Any]:
    """kvlab.generate's options for a method beyond its model (the KV cache's quantization)."""
    if method.kind == "kv":
        return {"kv_quant": f"int{method.kv_bits}"}
    if method.kind == "bnb":
        return {"path": "hf"}  # bitsandbytes' modules run inside HF's forward; the twin reads plain weights
    return {}


def measure_speed(
    config, loaded, variants, methods, token_ids, prompt_len, device, probe_rounds: list
) -> dict[str, Any]:
    """TPOT etc. of every method, rounds interleaved; each timed round first appends the float32 read
    bandwidth of that minute to `probe_rounds` (the floors' bandwidth, kvlab.bench.core.floor)."""
    input_ids = make_inputs(token_ids, config.batch_size, prompt_len).to(device)
    runs: dict[str, list[dict[str, Any]]] = {BASELINE: [], **{m.name: [] for m in methods}}
    rounds = config.warmup + config.repeats
    progress = tqdm(total=rounds * len(runs), desc=f"quantization, prompt {prompt_len}", unit="run")
    bandwidths = []  # per timed round, its best probe: each round's TPOT is set against its own floor
    for round_index in range(rounds):
        if round_index >= config.warmup:
            probe_rounds.append(bandwidth_probes(torch.float32, device, iters=ROUND_ITERS))
            bandwidths.append(best_probe(probe_rounds[-1]))
        for name in runs:
            with PeakMemory(device) as peak:
                if name == BASELINE:
                    times, out, kv_bytes, path = run_baseline(loaded, input_ids, config.new_tokens)
                else:
                    method = next(m for m in methods if m.name == name)
                    result = generate(variants[name], input_ids, config.new_tokens, **generate_kwargs(method))
                    times, out, kv_bytes, path = (
                        result.token_times,
                        result.tokens,
                        result.cache_bytes,
                        result.path,
                    )
            if round_index >= config.warmup:
                runs[name].append(
                    {
                        "ttft_s": ttft_s(times),
                        "tpot_s": tpot_s(times),
                        "peak_bytes": peak.bytes,
                        "peak_rise_bytes": max(0, peak.bytes - peak.start),
                        "memory_kind": peak.kind,
                        "kv_cache_bytes": kv_bytes,
                        "path": path,
                        "tokens": out.tolist(),
                    }
                )
            progress.update()
    progress.close()
    reference = runs["float32"][0]["tokens"] if "float32" in runs else runs[BASELINE][0]["tokens"]
    agreement = {
        name: min(matching_prefix(a, b) for a, b in zip(reference, samples[0]["tokens"], strict=True))
        for name, samples in runs.items()
    }
    return {
        "prompt_len": prompt_len,
        "runs": runs,
        "greedy_prefix_vs_float32": agreement,
        "round_bandwidths": bandwidths,
    }


def measure_ppl(config: QuantBenchConfig, loaded: LoadedModel, model, method: Method, text, tokens) -> dict:
    """wikitext-2 test PPL of the method's model (the protocol of kvlab.bench.eval.perplexity)."""
    if method.kind == "kv":
        return chunked_kv_ppl(config, loaded.model, tokens[0], method.kv_bits)
    variant = dataclasses.replace(loaded, model=model)
    result = bench_perplexity(variant, text, config.ppl, tokens, show_progress=False)
    return {"ppl": result.ppl, "protocol": result.protocol, "num_tokens": result.num_tokens}


def chunked_kv_ppl(config: QuantBenchConfig, model, token_ids, bits: int) -> dict:
    """PPL with the KV cache quantized: windows fed 64 tokens at a time, so later chunks read the cache
    as it stores them (kvlab.bench.eval.kv_quant_ppl); float32 the same way for the comparison."""
    window = min(config.ppl.max_length, len(token_ids))
    windows = max(1, min(config.ppl.max_tokens, len(token_ids)) // window)
    quantized = chunked_cache_ppl(model, token_ids, kv_quant=f"int{bits}", window=window, max_windows=windows)
    reference = chunked_cache_ppl(model, token_ids, window=window, max_windows=windows)
    return {
        "ppl": quantized.ppl,
        "float32_ppl": reference.ppl,
        "kv_bytes": quantized.kv_bytes,
        "float32_kv_bytes": quantized.float32_kv_bytes,
        "kv_bytes_ratio": quantized.byte_ratio,
        "protocol": (
            f"{windows} windows of {window} tokens fed {quantized.chunk} at a time through the cache "
            f"({quantized.kv}); float32 cache the same way: PPL {reference.ppl:.3f}; KV bytes after a window"
        ),
    }


def engine_agreement(config: QuantBenchConfig, loaded: LoadedModel, model, method: Method, token_ids) -> dict:
    """Greedy tokens of the paged engine on the method's model against kvlab.generate's, first prompt."""
    if method.kind == "kv":
        return {"checked": False, "reason": "the engine's KV quantization is its own option (see README)"}
    if method.kind == "bnb":
        return {"checked": False, "reason": "bitsandbytes modules run on the HF path only"}
    from kvlab.llm import LLM

    prompt = token_ids[: config.prompt_lengths[0]]
    variant = dataclasses.replace(loaded, model=model)
    parameter = next(p for p in model.parameters())
    llm = LLM(variant, dtype=str(parameter.dtype).removeprefix("torch."), device=parameter.device.type)
    engine = llm.generate([prompt.tolist()], SamplingParams(max_tokens=config.new_tokens, ignore_eos=True))
    with torch.inference_mode():
        direct = generate(model, prompt[None].to(parameter.device), config.new_tokens).tokens[0].tolist()
    got = engine[0].output_token_ids
    return {"checked": True, "identical": got == direct, "matching_prefix": matching_prefix(got, direct)}
