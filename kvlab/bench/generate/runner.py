"""Baseline (`model.generate`) and optimized (`kvlab.generate` + a technique's cache) on identical inputs.

Per dtype and prompt length: warm-up runs, then `repeats` rounds that alternate baseline and optimized
so that drift of the machine hits both alike. Output length is fixed (min = max new tokens).
"""

import dataclasses
import statistics
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from kvlab.bench.core.baselines import run_baseline
from kvlab.bench.core.floor import (
    Floor,
    best_probe,
    floor_of_rounds,
    mean_decode_context,
    probe_round,
    probed_run,
    round_over_floor,
)
from kvlab.bench.core.machine import machine_info, prepare_kernels
from kvlab.bench.core.memory import PeakMemory, model_resident_bytes
from kvlab.bench.core.metrics import Summary, matching_prefix, same_round_ratios, tpot_s, ttft_s
from kvlab.bench.generate.config import BenchConfig
from kvlab.bench.generate.registry import TECHNIQUES
from kvlab.errors import PromptTooLongError
from kvlab.generate import generate
from kvlab.models.loader import LoadedModel, load_model, resolve_device


@dataclass(slots=True)
class Sample:
    """One measured call."""

    token_times: list[float]
    tokens: list[list[int]]
    kv_cache_bytes: int
    peak_memory_bytes: int
    peak_memory_delta_bytes: int
    memory_kind: str
    forward_path: str  # "hf" (model.generate, or kvlab.generate on the HF model) or "native"


@dataclass(slots=True)
class RunRecord:
    method: str
    dtype: str
    batch_size: int
    prompt_len: int
    new_tokens: int
    ttft_s: Summary
    tpot_s: Summary
    output_tokens_per_s: Summary
    prefill_tokens_per_s: Summary
    peak_memory_bytes: Summary
    peak_memory_delta_bytes: Summary  # rise over the run's start
    peak_memory_rise_bytes: Summary  # rise over the loaded model (live memory right after loading)
    memory_kind: str
    kv_cache_bytes: int
    tpot_over_floor: float  # median over the rounds of TPOT / that round's floor
    floor_tpot_s: float  # median of the rounds' floors (weights, plus the KV it must read)
    round_floor_tpot_s: list[float] = field(default_factory=list)  # per sample, its round's floor
    round_bandwidth_bytes_per_s: list[float] = field(default_factory=list)  # per sample, its probes' best
    forward_path: str = "hf"
    tokens: list[list[int]] = field(default_factory=list)


@dataclass(slots=True)
class Agreement:
    """Greedy outputs of the two paths on the same inputs."""

    dtype: str
    prompt_len: int
    identical: bool
    matching_prefix: int  # shortest common prefix over the batch rows
    new_tokens: int


@dataclass(slots=True)
class DtypeRatio:
    """One dtype's TPOT over the reference dtype's, the two measured round by round."""

    dtype: str
    reference: str
    prompt_len: int
    method: str
    tpot_ratio: float  # median over the rounds of that round's ratio
    round_ratios: list[float]


@dataclass(slots=True)
class BenchResult:
    config: BenchConfig
    model_name: str
    model_source: str
    meaningful_ppl: bool
    floors: dict[str, Floor]
    model_resident_bytes: dict[str, int]  # per dtype: live memory after every dtype's model loaded
    runs: list[RunRecord]
    agreement: list[Agreement]
    ppl: dict | None = None
    quality: dict | None = None  # technique-specific quality (e.g. compressed-cache PPL vs full cache)
    machine: dict | None = None  # where it ran (core.machine.machine_info), read where it ran
    dtype_ratios: list[DtypeRatio] = field(default_factory=list)


def run_optimized(loaded: LoadedModel, input_ids: torch.Tensor, new_tokens: int, config: BenchConfig):
    total = input_ids.shape[1] + new_tokens - 1  # the last sampled token is never fed back
    technique = TECHNIQUES[config.technique]
    if technique.press is not None:
        press, budget = technique.press(config)
        path = "hf" if config.forward_path == "hf" else "auto"
        result = generate(loaded.model, input_ids, new_tokens, press=press, budget=budget, path=path)
        return result.token_times, result.tokens, result.cache_bytes, result.path
    cache = technique.make_cache(loaded.model, total, config)
    with technique.hooks(cache, loaded.model):
        result = generate(loaded.model, input_ids, new_tokens, cache=cache)
    return result.token_times, result.tokens, result.cache_bytes, result.path


def measure(method: str, loaded: LoadedModel, input_ids: torch.Tensor, config: BenchConfig) -> Sample:
    with PeakMemory(input_ids.device) as peak:
        if method == "baseline":
            times, tokens, kv_bytes, path = run_baseline(loaded, input_ids, config.new_tokens)
        else:
            times, tokens, kv_bytes, path = run_optimized(loaded, input_ids, config.new_tokens, config)
    return Sample(times, tokens.tolist(), kv_bytes, peak.bytes, peak.delta, peak.kind, path)


def summarize(
    method: str,
    dtype: str,
    input_ids: torch.Tensor,
    samples: list[Sample],
    floors: list[Floor],
    model_resident: int,
    full_cache: bool,
) -> RunRecord:
    """floors: each sample's round's floor. full_cache: the run attends every position (model.generate,
    a static cache), so its floor counts the K/V reads; a press keeps fewer, and its floor counts the
    weights alone."""
    batch, prompt_len = input_ids.shape
    new_tokens = len(samples[0].token_times)
    context = mean_decode_context(prompt_len, new_tokens) if full_cache else 0.0
    round_floors = [floor.tpot_at(context, batch) for floor in floors]
    floor_tpot = statistics.median(round_floors)
    ttft = [ttft_s(s.token_times) for s in samples]
    tpot = [tpot_s(s.token_times) for s in samples]
    return RunRecord(
        method=method,
        dtype=dtype,
        batch_size=batch,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        ttft_s=Summary.of(ttft),
        tpot_s=Summary.of(tpot),
        output_tokens_per_s=Summary.of([batch * len(s.token_times) / s.token_times[-1] for s in samples]),
        prefill_tokens_per_s=Summary.of([batch * prompt_len / t for t in ttft]),
        peak_memory_bytes=Summary.of([float(s.peak_memory_bytes) for s in samples]),
        peak_memory_delta_bytes=Summary.of([float(s.peak_memory_delta_bytes) for s in samples]),
        peak_memory_rise_bytes=Summary.of(
            [float(max(0, s.peak_memory_bytes - model_resident)) for s in samples]
        ),
        memory_kind=samples[0].memory_kind,
        kv_cache_bytes=samples[0].kv_cache_bytes,
        tpot_over_floor=round_over_floor(tpot, round_floors),
        floor_tpot_s=floor_tpot,
        round_floor_tpot_s=round_floors,
        round_bandwidth_bytes_per_s=[floor.bandwidth_bytes_per_s for floor in floors],
        forward_path=samples[0].forward_path,
        tokens=samples[0].tokens,
    )


def agreement(
    dtype: str, prompt_len: int, baseline: list[list[int]], optimized: list[list[int]]
) -> Agreement:
    prefixes = [matching_prefix(a, b) for a, b in zip(baseline, optimized, strict=True)]
    return Agreement(dtype, prompt_len, baseline == optimized, min(prefixes), len(baseline[0]))


def make_inputs(token_ids: torch.Tensor, batch_size: int, prompt_len: int) -> torch.Tensor:
    """Consecutive, non-overlapping windows of the dataset's token stream: row i = tokens[i*L:(i+1)*L]."""
    needed = batch_size * prompt_len
    if token_ids.numel() < needed:
        raise PromptTooLongError(
            f"the dataset has {token_ids.numel()} tokens; {batch_size} prompts of {prompt_len} need {needed}"
        )
    return token_ids[:needed].view(batch_size, prompt_len)


def run(config: BenchConfig, token_ids: torch.Tensor, ppl_fn=None) -> BenchResult:
    """Measure every (dtype, prompt length) cell for the configured methods.

    Every dtype's model is loaded first and each round runs every dtype in turn: a VM's memory has
    fast and slow spells of seconds to minutes, and dtypes measured one after the other can each land
    in a different one (on a 2-core AMD EPYC, bfloat16 / float32 TPOT read 0.45x at one prompt length
    and 0.69x at the other that way). A round runs each method at every dtype back to back, so each
    round's ratio of dtypes compares runs a probe apart, mostly in the same spell (`dtype_ratios`)."""
    device = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    prepare_kernels()  # a kernel build or calibration must never fall inside a measured time
    methods = ["baseline", "optimized"] if config.method == "both" else [config.method]
    models = load_models(config)
    first = models[config.dtypes[0]]
    # Live memory with every model loaded: what each run's peak rises over.
    resident_all = model_resident_bytes(*(loaded.model for loaded in models.values()))
    resident = dict.fromkeys(models, resident_all)
    ppl = ppl_fn(first) if ppl_fn is not None else None
    quality_fn = TECHNIQUES[config.technique].quality
    quality = quality_fn(first, token_ids, config) if quality_fn is not None and config.ppl.enabled else None
    cells = [
        (length, dtype, method) for length in config.prompt_lengths for dtype in models for method in methods
    ]
    progress = tqdm(total=len(cells) * (config.warmup + config.repeats), desc="bench", unit="run")
    # The memory's bandwidth is probed right before every timed run, which is set against that
    # probe's floor (kvlab.bench.core.floor).
    probe_rounds: dict[str, list[dict[str, float]]] = {dtype: [] for dtype in models}
    attempts: dict[str, list[int]] = {dtype: [] for dtype in models}  # per timed run (probed_run)
    measured: list[tuple[torch.Tensor, dict, dict]] = []  # per prompt length: samples, bandwidths
    for prompt_len in config.prompt_lengths:
        input_ids = make_inputs(token_ids, config.batch_size, prompt_len).to(device)
        samples = {(dtype, method): [] for dtype in models for method in methods}
        bandwidths = {key: [] for key in samples}  # the best probe right before each run
        for round_index in range(config.warmup + config.repeats):
            # dtypes inner: a method's runs at the two dtypes follow each other, a probe apart
            for method in methods:
                for dtype, loaded in models.items():
                    if round_index < config.warmup:
                        measure(method, loaded, input_ids, config)
                    else:
                        probed = probed_run(
                            loaded.model,
                            lambda: measure(method, loaded, input_ids, config),  # noqa: B023 (called now)
                            probe=probe_round,
                        )
                        probe_rounds[dtype].append(probed.probes)
                        bandwidths[dtype, method].append(best_probe(probed.probes))
                        samples[dtype, method].append(probed.result)
                        attempts[dtype].append(probed.attempts)
                    progress.update()
        measured.append((input_ids, samples, bandwidths))
    progress.close()
    floors = {
        dtype: dataclasses.replace(
            floor_of_rounds(models[dtype].model, probe_rounds[dtype]),
            remeasured_runs=sum(count > 1 for count in attempts[dtype]),
        )
        for dtype in models
    }
    runs, agreements = [], []
    for dtype in models:
        for input_ids, samples, bandwidths in measured:
            for method in methods:
                full_cache = method == "baseline" or TECHNIQUES[config.technique].press is None
                round_floors = [floors[dtype].at_bandwidth(b) for b in bandwidths[dtype, method]]
                runs.append(
                    summarize(
                        method,
                        dtype,
                        input_ids,
                        samples[dtype, method],
                        round_floors,
                        resident[dtype],
                        full_cache,
                    )
                )
            if len(methods) == 2:
                agreements.append(
                    agreement(
                        dtype,
                        input_ids.shape[1],
                        samples[dtype, "baseline"][0].tokens,
                        samples[dtype, "optimized"][0].tokens,
                    )
                )
    return BenchResult(
        config=config,
        model_name=first.name,
        model_source=first.source,
        meaningful_ppl=first.meaningful_ppl,
        floors=floors,
        model_resident_bytes=resident,
        runs=runs,
        agreement=agreements,
        ppl=ppl,
        quality=quality,
        machine=machine_info(device),  # a sweep cell may run on a Ray worker, with its own threads
        dtype_ratios=dtype_ratios(runs, config.dtypes[0]),
    )


def load_models(config: BenchConfig) -> dict[str, LoadedModel]:
    """The model at every configured dtype, each checked to hold the longest prompt + new tokens."""
    models = {}
    for dtype in config.dtypes:
        loaded = load_model(config.model, dtype=dtype, device=config.device, seed=config.seed)
        longest = max(config.prompt_lengths) + config.new_tokens
        if longest > loaded.context_length:
            raise PromptTooLongError(
                f"prompt length {max(config.prompt_lengths)} + new_tokens {config.new_tokens} exceeds "
                f"{config.model}'s context of {loaded.context_length} tokens"
            )
        models[dtype] = loaded
    return models


def dtype_ratios(runs: list[RunRecord], reference: str) -> list[DtypeRatio]:
    """Each other dtype's TPOT over `reference`'s, per prompt length and method: the median over the
    rounds of the ratio of the two runs of one round (sample i of every cell ran in round i)."""
    by_key = {(r.dtype, r.prompt_len, r.method): r for r in runs}
    ratios = []
    for r in runs:
        base = by_key.get((reference, r.prompt_len, r.method))
        if r.dtype == reference or base is None:
            continue
        paired = same_round_ratios(r.tpot_s.samples, base.tpot_s.samples)
        ratios.append(
            DtypeRatio(r.dtype, reference, r.prompt_len, r.method, statistics.median(paired), paired)
        )
    return ratios
