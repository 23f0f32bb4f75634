"""The kernel micro-benchmark: kvlab's skinny GEMM against torch over every weight matrix a decode step
multiplies (the model's real weights), per rows count and dtype, and paged decode attention against
torch's SDPA and an earlier revision's op (`attention.past_revision`, built from git history), with
the machine's read bandwidth and arithmetic peak (each variant's multiply-add on registers, torch's matmul)
measured in the same run.

One pass = every Linear weight of the model once (all layers and the LM head), as one decode step of
`rows` requests reads them: each matrix called one by one per kernel, and the engine's fused decode
step of `rows` requests (one op over the same weights) where the model has one. Each (dtype, rows,
kernel) is timed over `repeats` passes after a warm-up, kernels interleaved pass by pass so that a busy
spell of the machine hits them alike.
"""

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kvlab.attention.backends.registry import get_backend
from kvlab.attention.metadata import AttentionMetadata
from kvlab.bench.core.floor import bandwidth_probes, best_seconds, kv_shape, probed_run
from kvlab.bench.core.machine import machine_info, prepare_kernels
from kvlab.bench.kernels.config import KernelsConfig
from kvlab.bench.kernels.past_kernel import PastKernelUnavailable, past_paged_attention
from kvlab.bench.kernels.report import FUSED_STEP, MODEL_PATH, PEAK_SIDE, TORCH, write_kernels_report
from kvlab.errors import ConfigError
from kvlab.hardware import emulated_half
from kvlab.kernels import calibrate
from kvlab.kernels import cpu as cpu_kernels
from kvlab.models import huge_pages, native
from kvlab.models.loader import load_model, resolve_dtype
from kvlab.models.native import build_engine_model


def candidates(dtype: torch.dtype) -> dict[str, Any]:
    """name -> f(x, weight): each kvlab variant this CPU runs, torch, and the model's calibrated path."""
    kernels: dict[str, Any] = {}
    for variant in calibrate.distinct_variants(dtype, cpu_kernels.variants()):
        kernels[f"kvlab {variant}"] = lambda x, w, v=variant: cpu_kernels.skinny_linear(x, w, variant=v)
    kernels[TORCH] = F.linear
    kernels[MODEL_PATH] = native.linear
    return kernels


def model_path_kernel(dtype: torch.dtype, rows: int) -> str:
    """What `native.linear` runs for `rows` rows: the calibration's kernel, torch above the skinny GEMM's
    rows, torch in float32 for many half-precision rows where the CPU emulates half math."""
    if rows <= cpu_kernels.SKINNY_MAX_ROWS:
        kernel = cpu_kernels.calibration().decision(dtype, rows).kernel
        if kernel != TORCH:
            return kernel
    if (
        rows >= native.UPCAST_MIN_ROWS
        and dtype != torch.float32
        and emulated_half(torch.empty(0, dtype=dtype))
    ):
        return "torch (float32)"
    return TORCH


def time_passes(
    kernels: dict[str, Any],
    weights: list[torch.Tensor],
    inputs: dict,
    repeats: int,
    probed_model: Any = None,  # an EngineModel or torch module: its dtype and device are probed
    steps: dict[str, Callable[[], object]] | None = None,
) -> tuple[dict[str, list[float]], list[dict[str, float]], int]:
    """Seconds per full pass over `weights`, per kernel: `repeats` rounds after one warm-up round, each
    round every kernel once, then each of `steps` (whole passes: a decode step over the same weights).
    With `probed_model` the read bandwidth is probed at its dtype before and after each timed round, and
    a round is measured again while the two disagree (kvlab.bench.core.floor.probed_run): a probe taken
    before a round alone can meet another memory speed than the round. -> (samples, each timed round's
    probes (the better reading of each), rounds measured again)."""
    steps = steps or {}
    samples: dict[str, list[float]] = {name: [] for name in [*kernels, *steps]}

    def one_round() -> dict[str, float]:
        # Each timed pass right after an untimed call of the same kernel, as decode steps follow each
        # other: the first call after the probes (which map and free ~1.5 GiB) or after another kernel
        # took up to 3x its steady time in some rounds (bf16 one-row steps of 18-20 ms between 6-9 ms).
        seconds = {}
        for name, run in kernels.items():
            run(inputs[weights[0].shape[1]], weights[0])
            start = time.perf_counter()
            for w in weights:
                run(inputs[w.shape[1]], w)
            seconds[name] = time.perf_counter() - start
        for name, step in steps.items():
            step()
            start = time.perf_counter()
            step()
            seconds[name] = time.perf_counter() - start
        return seconds

    one_round()  # warm-up
    rounds: list[dict[str, float]] = []
    remeasured = 0
    for _ in range(repeats):
        if probed_model is None:
            seconds = one_round()
        else:
            probed = probed_run(probed_model, one_round)
            seconds = probed.result
            rounds.append(probed.probes)
            remeasured += probed.attempts > 1
        for name, value in seconds.items():
            samples[name].append(value)
    return samples, rounds, remeasured


def fused_step(engine_model, rows: int, seed: int) -> tuple[Callable[[], object], str] | None:
    """(a call of one decode step of `rows` requests, each one token deep, as the engine runs it: every
    layer's matmuls, norms and attention and the LM head in one op; its skinny variant), or None where
    the model has no such step (another architecture, or the calibration gives these rows to torch).
    Its attention reads one cached position per request: the step reads the same weights as a pass."""
    block = 16
    caches = engine_model.allocate_kv_caches(num_blocks=rows, block_size=block)
    metadata = AttentionMetadata.from_lists([1] * rows, [1] * rows, [[row] for row in range(rows)], block)
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(engine_model.embed.shape[0], (rows,), generator=generator)
    positions = torch.zeros(rows, dtype=torch.long)
    backend = get_backend("auto", torch.device("cpu"))
    variant = engine_model.fused_decode_variant(input_ids, caches, metadata, backend)
    if variant is None:
        return None
    return (lambda: engine_model.decode_logits(input_ids, positions, caches, metadata, backend)), variant


def max_error(kernels: dict[str, Any], weights: list[torch.Tensor], inputs: dict) -> dict[str, float]:
    """Largest |kernel - float64 reference| relative to the reference's largest entry, over a few matrices."""
    errors = {name: 0.0 for name in kernels}
    for w in weights[:: max(1, len(weights) // 8)]:
        x = inputs[w.shape[1]]
        reference = x.double() @ w.double().T
        scale = reference.abs().max().item() or 1.0
        for name, run in kernels.items():
            error = (run(x, w).double() - reference).abs().max().item() / scale
            errors[name] = max(errors[name], error)
    return errors


def matmul_peak_flops(dtype: torch.dtype) -> float:
    """FLOP/s of torch's square matmul at PEAK_SIDE: the arithmetic a GEMM can reach on these cores."""
    a = torch.randn(PEAK_SIDE, PEAK_SIDE).to(dtype)
    b = torch.randn(PEAK_SIDE, PEAK_SIDE).to(dtype)
    return 2 * PEAK_SIDE**3 / best_seconds(lambda: a @ b, torch.device("cpu"), iters=3)


def model_at(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model` at `dtype`: itself, or a copy with its weights in 2 MiB pages, as a model loaded at that
    dtype holds them (kvlab.models.huge_pages). A plain copy sits in 4 KiB pages, where the bf16 decode
    step read 12.5 ms a pass against 7.7 for the same matrices in 2 MiB pages (2-core AMD EPYC)."""
    from kvlab.quant.modules import place_weights

    if model.dtype == dtype:
        return model
    copied = copy.deepcopy(model).to(dtype)
    place_weights(copied)
    return copied


def measure_gemm(config: KernelsConfig, model: torch.nn.Module, dtype_name: str) -> dict[str, Any]:
    dtype = resolve_dtype(dtype_name)
    # In 2 MiB pages and in the order a step reads them, as a model loaded at this dtype holds them.
    weights = huge_pages.place_tensors(
        w.to(dtype).contiguous() for w in build_engine_model(model).matmul_weights()
    )
    engine_model = build_engine_model(model_at(model, dtype))
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    params = sum(w.numel() for w in weights)
    generator = torch.Generator().manual_seed(config.seed)
    by_rows = {}
    # The read bandwidth is probed around every round of the one-row passes, which the floor bounds,
    # so it describes the minutes they ran in (kvlab.bench.core.floor).
    probe_rounds: list[dict[str, float]] = []
    remeasured_rounds = 0
    for rows in config.rows:
        inputs = {
            k: torch.randn(rows, k, generator=generator).to(dtype) for k in {w.shape[1] for w in weights}
        }
        kernels = candidates(dtype)
        step = fused_step(engine_model, rows, config.seed)
        steps = {FUSED_STEP: step[0]} if step else {}
        samples, rounds, remeasured = time_passes(
            kernels, weights, inputs, config.repeats, engine_model if rows == 1 else None, steps
        )
        probe_rounds += rounds
        remeasured_rounds += remeasured
        by_rows[str(rows)] = {
            "seconds": samples,
            "relative_error": max_error(kernels, weights, inputs),
            "model_path_kernel": model_path_kernel(dtype, rows),
        }
        if step:
            by_rows[str(rows)]["fused_step_variant"] = step[1]
    return {
        "num_matrices": len(weights),
        "weight_bytes": weight_bytes,
        "params": params,
        "probe_rounds": probe_rounds or [bandwidth_probes(dtype, torch.device("cpu"))],
        "remeasured_rounds": remeasured_rounds,
        "matmul_peak_flops": matmul_peak_flops(dtype),
        # Each distinct variant's multiply-add on registers: the arithmetic units' own peak.
        "multiply_add_peak_flops": {
            variant: cpu_kernels.peak_flops(variant, dtype)
            for variant in calibrate.distinct_variants(dtype, cpu_kernels.variants())
        },
        "by_rows": by_rows,
    }


def paged_case(config: KernelsConfig, model: torch.nn.Module, dtype: torch.dtype, index: int = 0):
    """Decode inputs of the model's attention shape: every request `context_len` tokens deep, its blocks
    scattered over the pool (a shuffled block order, as a long-running engine leaves them) in 2 MiB
    pages as the engine allocates it; `index` draws another case (another layer's cache)."""
    shape = config.attention
    heads = model.config.num_attention_heads
    _, kv_heads, head_dim = kv_shape(model.config)
    per_request = -(-shape.context_len // shape.block_size)
    num_blocks = shape.num_requests * per_request + 1
    generator = torch.Generator().manual_seed(config.seed + index)
    order = (torch.randperm(num_blocks - 1, generator=generator) + 1).tolist()  # block 0: table padding
    tables = [order[i * per_request : (i + 1) * per_request] for i in range(shape.num_requests)]
    cache_shape = (num_blocks, shape.block_size, kv_heads, head_dim)
    # In 2 MiB pages, as the engine's pool is (EngineModel.allocate_kv_caches).
    key_cache, value_cache = huge_pages.place_tensors(
        [torch.randn(cache_shape, generator=generator).to(dtype) for _ in range(2)]
    )
    metadata = AttentionMetadata.from_lists(
        [1] * shape.num_requests, [shape.context_len] * shape.num_requests, tables, shape.block_size
    )
    query = torch.randn(shape.num_requests, heads, head_dim, generator=generator).to(dtype)
    return query, key_cache, value_cache, metadata


def attention_kernels(config: KernelsConfig) -> tuple[dict[str, Callable[..., torch.Tensor]], str | None]:
    """name -> f(query, key_cache, value_cache, metadata, scale): kvlab's C++ op, torch's SDPA and, when
    it builds here, the past revision's op; and why the past revision is missing, if it is."""
    kernels = {name: get_backend(name).forward for name in ("cpu_paged", "sdpa")}
    revision = config.attention.past_revision
    if not revision:
        return kernels, None
    try:
        past = past_paged_attention(revision)
    except PastKernelUnavailable as error:
        return kernels, str(error)
    kernels[revision] = lambda q, k, v, m, scale: past(q, k, v, m.block_tables, m.seq_lens, scale)
    return kernels, None


def measure_attention(config: KernelsConfig, model: torch.nn.Module, dtype_name: str) -> dict[str, Any]:
    """Every kernel over the same caches, called in turn (a slow spell of the machine hits them alike),
    once with one cache for every call and once rotating over `attention.caches` caches: call i reads
    cache i mod caches, so a cache was last read `caches` calls earlier (if `caches` caches outsize the
    last-level cache, from memory). The first round is a warm-up."""
    dtype = resolve_dtype(dtype_name)
    cases = [paged_case(config, model, dtype, index) for index in range(config.attention.caches)]
    query, key_cache = cases[0][0], cases[0][1]
    scale = query.shape[-1] ** -0.5
    kernels, past_missing = attention_kernels(config)
    result: dict[str, Any] = {
        "kv_bytes": 2
        * query.shape[0]
        * config.attention.context_len
        * key_cache[0, 0].numel()
        * key_cache.element_size(),
        "max_abs_error": {},
        "seconds_by_caches": {},
    }
    if past_missing:
        result["past_revision_missing"] = past_missing
    for case in cases:
        reference = get_backend("reference").forward(*case, scale).float()
        for name, kernel in kernels.items():
            error = (kernel(*case, scale).float() - reference).abs().max().item()
            result["max_abs_error"][name] = max(error, result["max_abs_error"].get(name, 0.0))
    for count in sorted({1, config.attention.caches}):
        seconds: dict[str, list[float]] = {name: [] for name in kernels}
        calls = 0
        names = list(kernels)
        for index in range(config.attention.repeats + 1):
            # each round starts with the next kernel, so each follows every other equally often (what
            # the previous call left in the caches, e.g. sdpa's padded copies, hits them alike)
            for name in names[index % len(names) :] + names[: index % len(names)]:
                kernel, case = kernels[name], cases[calls % count]
                calls += 1
                start = time.perf_counter()
                kernel(*case, scale)
                if index:
                    seconds[name].append(time.perf_counter() - start)
        result["seconds_by_caches"][str(count)] = seconds
    return result


def run_kernels_bench(config: KernelsConfig, out_dir: Path, command: str) -> Path:
    if not cpu_kernels.available():
        raise ConfigError(f"the kernel bench needs kvlab's CPU kernels: {cpu_kernels.build_failure()}")
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    prepare_kernels()
    loaded = load_model(config.model, dtype="float32", seed=config.seed)
    payload: dict[str, Any] = {
        "command": command,
        "machine": machine_info(),
        "model": {"name": loaded.name, "source": loaded.source},
        "config": config.to_dict(),
        "calibration": {
            "threads": cpu_kernels.calibration().key["threads"],
            "row_buckets": list(calibrate.ROW_BUCKETS),
        },
        "gemm": {},
        "attention": {},
    }
    with torch.inference_mode():
        for dtype in config.dtypes:
            print(f"kvlab: kernel bench: skinny GEMM in {dtype}, rows {config.rows}", flush=True)
            payload["gemm"][dtype] = measure_gemm(config, loaded.model, dtype)
            print(f"kvlab: kernel bench: paged decode attention in {dtype}", flush=True)
            payload["attention"][dtype] = measure_attention(config, loaded.model, dtype)
    return write_kernels_report(payload, out_dir)
