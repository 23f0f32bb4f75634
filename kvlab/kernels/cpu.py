"""CPU kernels compiled from C++ once (build.py), with torch's as fallback, chosen by measurement.

Why a kernel of our own: a decode step multiplies a few rows (one per running request) by every
weight matrix, so its cost should be the weight bytes over the memory bandwidth. torch's matmuls
often stay far from that: on a 2-core AVX2 AMD EPYC (torch 2.13.0, MKL) float32 1-row products over
SmolLM2-135M's matrices streamed ~4 GB/s against 17 GB/s for a plain read, and on an AVX512-BF16
EPYC oneDNN's bf16 matrix-vector product streamed 9 GB/s against 30. The skinny GEMM
(skinny_gemm.cpp) streams each weight row once; its AVX2 / AVX-512 / AVX512-BF16 / AMX variants are picked
at run time by what the CPU reports, and whether it or torch serves a (dtype, rows) is decided by a
calibration run once per build, CPU, torch version and thread count (calibrate.py).

`prepare()` builds and calibrates up front; benches call it before timing anything.
`KVLAB_CPU_KERNELS=0` turns the kernels off (torch's everywhere), e.g. to measure what they bring;
`KVLAB_SKINNY_VARIANT=avx2|avx512|avx512bf16|amx` limits the skinny GEMM to one variant;
`KVLAB_FUSED_DECODE=0` runs Llama decode steps op by op instead of as one op (decode_step.cpp).
"""

import dataclasses
import functools
import os
import shutil
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor

from kvlab.errors import ConfigError
from kvlab.kernels import build, calibrate

SKINNY_MAX_ROWS = calibrate.ROW_BUCKETS[-1]
SKINNY_DTYPES = (torch.float32, torch.bfloat16)
VARIANT_ENV = "KVLAB_SKINNY_VARIANT"


def _switched_on(name: str) -> bool:
    """An on/off environment switch, on unless set to 0, false, no or off."""
    return os.environ.get(name, "1").strip().lower() not in ("0", "false", "no", "off")


def enabled_by_env() -> bool:
    return _switched_on("KVLAB_CPU_KERNELS")


@functools.cache
def build_failure() -> str | None:
    """Build and load the kernels once per process; None when they are ready, else why not."""
    if not enabled_by_env():
        return "turned off by KVLAB_CPU_KERNELS=0"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"needs an x86 CPU with AVX2 (torch reports {capability})"
    # A compiler is needed only to build: a prebuilt cache (the Docker image's runtime stage, which
    # has none) loads without one, as long as torch's ninja finds every object up to date.
    if not build.is_built() and shutil.which(build.compiler()) is None:
        return "no C++ compiler on PATH"
    try:
        build.build_and_load()
    except Exception as error:  # a failed build must not stop inference: torch's kernels still work
        last_line = (str(error).strip().splitlines() or [""])[-1]
        reason = f"build failed ({type(error).__name__}: {last_line})"
        warnings.warn(f"kvlab CPU kernels unavailable, using torch's: {reason}", stacklevel=2)
        return reason
    return None


def available() -> bool:
    return build_failure() is None


def ops():
    """torch.ops.kvlab, built and loaded; raises if the kernels cannot be built here."""
    failure = build_failure()
    if failure is not None:
        raise RuntimeError(f"kvlab CPU kernels are unavailable: {failure}")
    return torch.ops.kvlab


@functools.cache
def supported_variants() -> tuple[str, ...]:
    """The skinny GEMM variants this CPU can run, best first (the CPU's own report, via cpuid)."""
    return tuple(ops().skinny_variants())


def variants() -> tuple[str, ...]:
    """The variants the calibration may choose from: all supported, or the one KVLAB_SKINNY_VARIANT names."""
    return _variants(os.environ.get(VARIANT_ENV, ""))


@functools.cache
def _variants(forced: str) -> tuple[str, ...]:
    forced = _forced_variant(VARIANT_ENV, forced, supported_variants(), "skinny GEMM")
    return (forced,) if forced else supported_variants()


def _forced_variant(env: str, value: str, choices: tuple[str, ...], kernel: str) -> str:
    """The variant an environment switch names (normalised), "" when unset; ConfigError when this CPU
    does not run it."""
    forced = value.strip().lower()
    if forced and forced not in choices:
        raise ConfigError(
            f"{env}={forced!r} is not a {kernel} variant this CPU runs; choose one of {', '.join(choices)}"
        )
    return forced


def _skinny_variant_op(x: Tensor, weight: Tensor, variant: str) -> Tensor:
    return ops().skinny_linear(x, weight, None, variant)


def _quant_variant_op(x: Tensor, weight, variant: str) -> Tensor:
    return ops().quant_linear(x, *_packed(weight), None, variant)


@functools.cache
def _calibration_at(threads: int) -> calibrate.Calibration:
    del threads  # part of the cache key: a new thread count is a new calibration
    return calibrate.load_or_measure(
        build.build_dir(),
        build.source_digest(),
        variants(),
        _skinny_variant_op,
        quant_variants=calibrated_quant_variants(),
        quant_linear=_quant_variant_op,
    )


def calibration() -> calibrate.Calibration:
    """The kernel choice per (dtype, rows) at torch's current thread count: cached, else measured (~20 s).
    Called once per matmul, so it is one cached lookup once loaded (KVLAB_SKINNY_VARIANT is read then)."""
    return _calibration_at(torch.get_num_threads())


def recalibrate() -> calibrate.Calibration:
    """Measure again and replace the cached table (e.g. one taken while the machine was busy)."""
    ops()
    calibrate.load_or_measure(
        build.build_dir(),
        build.source_digest(),
        variants(),
        _skinny_variant_op,
        fresh=True,
        quant_variants=calibrated_quant_variants(),
        quant_linear=_quant_variant_op,
    )
    _calibration_at.cache_clear()
    table = calibration()
    table.measured_now = True
    return table


def prepare() -> None:
    """Build the kernels and calibrate now, so neither falls inside a measured time. Call it after
    setting torch's thread count (the calibration is per thread count). No-op without the kernels."""
    if available():
        calibration()


def describe() -> str:
    """One line for reports: which matmul kernel serves each (dtype, rows) here, and the other kernels."""
    failure = build_failure()
    if failure is not None:
        return f"torch's matmuls only (kvlab CPU kernels: {failure})"
    table = calibration()
    parts = []
    for dtype in SKINNY_DTYPES:
        spans, start = [], 1
        for size in calibrate.ROW_BUCKETS:
            d = table.decision(dtype, size)
            name = d.kernel if d.kernel == calibrate.TORCH else f"kvlab {d.kernel}"
            if spans and spans[-1][1] == name:
                spans[-1][0][1] = size
            else:
                spans.append(([start, size], name))
            start = size + 1
        text = ", ".join(
            f"rows {lo}-{hi} {name}" if lo != hi else f"row {lo} {name}" for (lo, hi), name in spans
        )
        parts.append(f"{str(dtype).removeprefix('torch.')}: {text}")
    quant = ", ".join(f"{bits}-bit {quant_variant(bits)}" for bits in calibrate.QUANT_FORMATS)
    return (
        f"kvlab C++ kernels: skinny GEMM by calibration at {table.key['threads']} threads "
        f"({'; '.join(parts)}; torch above {SKINNY_MAX_ROWS} rows), quantized GEMM ({quant}), "
        "paged decode attention, RMSNorm (fused with the residual add), RoPE, whole Llama decode "
        "steps as one op"
    )


def handles(x: Tensor) -> bool:
    """Whether the row-wise kernels (RMSNorm, RoPE) take x: a float32 or bfloat16 CPU tensor."""
    return x.device.type == "cpu" and x.dtype in SKINNY_DTYPES and available()


def skinny_serves(dtype: torch.dtype) -> bool:
    """Whether the calibration gave one-row CPU matmuls at `dtype` to kvlab's skinny GEMM."""
    return (
        dtype in SKINNY_DTYPES and available() and calibration().decision(dtype, 1).kernel != calibrate.TORCH
    )


def skinny_choice(x: Tensor, weight: Tensor) -> str | None:
    """The skinny GEMM variant that runs x @ weight.T, or None where torch runs it: few CPU rows
    where the calibration chose kvlab's kernel. Called once per linear layer, so the cheap checks
    come first and the calibration is one dict lookup."""
    if x.dim() != 2:
        return None
    rows = x.shape[0]
    if (
        rows > SKINNY_MAX_ROWS
        or x.dtype != weight.dtype
        or x.dtype not in SKINNY_DTYPES
        or x.device.type != "cpu"
        or not weight.is_contiguous()
        or rows == 0
        or not available()
    ):
        return None
    decision = calibration().decision(x.dtype, rows)
    return None if decision.kernel == calibrate.TORCH else decision.variant


def takes_skinny(x: Tensor, weight: Tensor) -> bool:
    """Whether x @ weight.T goes to the skinny GEMM (see skinny_choice)."""
    return skinny_choice(x, weight) is not None


def fused_decode_variant(dtype: torch.dtype, rows: int, quantized: bool = False) -> str | None:
    """The skinny GEMM variant a fused decode step of `rows` rows runs at `dtype` (decode_step.cpp),
    or None where it does not run: kernels unavailable or off, or the calibration gave those rows to
    torch (a quantized model's matrices have no torch kernel at these rows: its step runs regardless)."""
    if (
        dtype not in SKINNY_DTYPES
        or not 0 < rows <= SKINNY_MAX_ROWS
        or not available()
        or not _switched_on("KVLAB_FUSED_DECODE")
    ):
        return None
    decision = calibration().decision(dtype, rows)
    return None if decision.kernel == calibrate.TORCH and not quantized else decision.variant


def skinny_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, variant: str | None = None
) -> Tensor:
    """x (M, K) @ weight (N, K).T + bias, accumulated in float32, returned in x's dtype, by the skinny
    GEMM: `variant` ("avx2", "avx512", "avx512bf16", "amx"), or the calibration's fastest for this shape."""
    return _op().skinny_linear(x, weight, bias, variant or skinny_variant(x.dtype, x.shape[0]))


@functools.cache
def _op():
    """The resolved op namespace (ops() checks the build; this skips the check on the hot path)."""
    return ops()


def peak_flops(variant: str, dtype: torch.dtype, iterations: int = 2_000_000, repeats: int = 3) -> float:
    """FLOP/s of `variant`'s multiply-add at `dtype` on registers, every torch thread at once (the best of
    `repeats` runs of `iterations` rounds): the arithmetic peak its kernels can approach. bf16 variants
    that widen the weights issue float32 FMAs; AMX's tiles are not probed (its vdpbf16ps fallback is)."""
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(dtype)
    if name is None:
        raise ValueError(f"peak_flops: float32 or bfloat16, got {dtype}")
    return max(_op().skinny_peak_flops(variant, name, iterations) for _ in range(repeats))


def skinny_variant(dtype: torch.dtype, rows: int = 1) -> str:
    """The variant skinny_linear runs for `rows` rows at `dtype` (for reports)."""
    return calibration().decision(dtype, min(max(rows, 1), SKINNY_MAX_ROWS)).variant


def build_directory() -> Path:
    return build.build_dir()


def paged_decode_attention(
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    scale: float,
) -> Tensor:
    """query (B, H, D), one token per request, over its paged context -> (B, H, D) in query's dtype."""
    return ops().paged_decode_attention(
        query.contiguous(), key_cache, value_cache, block_tables, seq_lens, scale
    )


STEP_MATRICES = ("q", "k", "v", "o", "gate", "up", "down")  # per layer, in decode_step.cpp's order


@dataclasses.dataclass(frozen=True, slots=True)
class StepWeights:
    """decode_step's per-layer weights, handed to the C++ op once per model (`native`, a torch custom
    class that holds them): a step passes that one object, not nine lists of a tensor per layer.
    `quant_bits`: the bits of most of its quantized matrices (the op then also runs the quantized GEMM,
    the variant calibrated for that format), 0 when none is."""

    native: torch.ScriptObject
    quant_bits: int = 0

    @property
    def quantized(self) -> bool:
        return self.quant_bits > 0

    @classmethod
    def from_layers(cls, layers: dict[str, list]) -> "StepWeights":
        """`layers` maps input_norm, post_norm and each matrix name to its per-layer list (a matrix: a
        tensor or a QuantizedWeight). A quantized matrix goes as its codes, with seven scale, offset and
        group-size entries per layer (None / 0 for a dense matrix); all three are empty when none is."""
        flat = [w for layer in zip(*(layers[name] for name in STEP_MATRICES), strict=True) for w in layer]
        quantized = [None if isinstance(w, Tensor) else w for w in flat]
        tensors = dict(layers)
        scales, offsets, group_sizes = [], [], []
        if any(q is not None for q in quantized):
            tensors |= {
                name: [w if isinstance(w, Tensor) else w.data for w in layers[name]] for name in STEP_MATRICES
            }
            scales = [None if q is None else q.scales for q in quantized]
            offsets = [None if q is None else q.offsets for q in quantized]
            group_sizes = [0 if q is None else q.group_size for q in quantized]
        native = torch.classes.kvlab.StepWeights(
            *(tensors[name] for name in STEP_ORDER), scales, offsets, group_sizes
        )
        bits = Counter(q.bits for q in quantized if q is not None)
        return cls(native, bits.most_common(1)[0][0] if bits else 0)


STEP_ORDER = ("input_norm", "q", "k", "v", "o", "post_norm", "gate", "up", "down")  # StepWeights' arguments


def step_caches(kv_caches: list[tuple[Tensor, Tensor]]) -> torch.ScriptObject:
    """A forward's per-layer (key, value) caches as the one object decode_step takes (built once per
    cache set: passed as lists, each step paid for walking them)."""
    keys, values = zip(*kv_caches, strict=True)
    return torch.classes.kvlab.StepCaches(list(keys), list(values))


def decode_step(
    input_ids: Tensor,
    positions: Tensor,
    embedding: Tensor,
    rope: tuple[Tensor, Tensor],
    weights: StepWeights,
    final_norm: Tensor,
    caches: torch.ScriptObject,
    metadata,
    num_heads: int,
    eps: float,
    scale: float,
    variant: str,
    lm_head: Tensor | None = None,
) -> Tensor:
    """One whole Llama decode step (kvlab/kernels/decode_step.cpp) of the tokens `input_ids` (M,) at
    `positions` (M,): it looks up their rows of `embedding` (vocab, hidden) and of the RoPE tables
    `rope` = (cos, sin), each (positions, rotary_dim // 2); `caches` the per-layer K/V caches as
    `step_caches` holds them; `metadata` one AttentionMetadata per layer. -> final-normed hidden
    (M, hidden), or with `lm_head` (vocab, hidden) in the model's dtype the logits (M, vocab)."""
    if all(m is metadata[0] for m in metadata):  # every layer reads the same slots: pass them once
        metadata = metadata[:1]
    return _op().decode_step(
        input_ids,
        positions,
        embedding,
        *rope,
        weights.native,
        final_norm,
        caches,
        [m.slot_mapping for m in metadata],
        [m.seq_lens for m in metadata],
        [m.block_tables for m in metadata],
        num_heads,
        eps,
        scale,
        variant,
        quant_variant(weights.quant_bits) if weights.quantized else "",
        lm_head,
    )


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm of the rows of x (T, hidden)."""
    return ops().rms_norm(x.contiguous(), weight, eps)


def add_rms_norm_(residual: Tensor, x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """residual += x in place (contiguous residual), then its RMSNorm."""
    return ops().add_rms_norm_(residual, x.contiguous(), weight, eps)


def rotary_(x: Tensor, cos: Tensor, sin: Tensor) -> None:
    """Rotate x (T, heads, head_dim), a view with unit last stride, in place; cos/sin (T, rotary_dim // 2)."""
    ops().rotary_(x, cos, sin)


def argmax_rows(logits: Tensor) -> Tensor:
    """The first index of each row's maximum, as logits.max(dim=-1).indices: logits (rows, vocab),
    float32 or bfloat16, in one vectorised pass, the threads splitting the columns (argmax.cpp)."""
    return ops().argmax_rows(logits.contiguous())


@functools.cache
def quant_variants() -> tuple[str, ...]:
    """The quantized GEMM variants this CPU runs, best first (quant_gemm.cpp)."""
    return tuple(ops().quant_variants())


INTEGER_VARIANTS = ("avx512vnni",)  # quantize the inputs to int8 (quant_avx512vnni.cpp)
INT16_VARIANTS = ("avx512vnni-x16",)  # round the inputs to int16 (quant_avx512_x16.cpp)


def quant_variant(bits: int | None = None) -> str:
    """The quantized GEMM variant that runs: KVLAB_QUANT_VARIANT if set; else, for `bits`-bit weights,
    the calibration's fastest of the float variants and the int16-input one (its products differ from
    the dequantized weights' by ~1e-5 relative, float32 summation noise); without `bits`, the widest
    float variant. The int8-input variant (avx512vnni) is opt-in only: it rounds the inputs to int8, so
    its products differ by about a percent (the quantization bench's kernel table times every variant)."""
    forced = _forced_quant_variant(os.environ.get("KVLAB_QUANT_VARIANT", ""))
    if forced or bits is None:
        return forced or calibrated_quant_variants()[0]
    decision = calibration().quant.get(calibrate.QUANT_FORMATS.get(bits, ""))
    return decision.variant if decision is not None else calibrated_quant_variants()[0]


@functools.cache
def _forced_quant_variant(forced: str) -> str:
    return _forced_variant("KVLAB_QUANT_VARIANT", forced, quant_variants(), "quantized GEMM")


def calibrated_quant_variants() -> tuple[str, ...]:
    """The quantized GEMM variants the calibration chooses from: the float ones widest first, then the
    int16-input one (a tie goes to the float variant)."""
    variants = quant_variants()
    floats = [v for v in variants if v not in INTEGER_VARIANTS + INT16_VARIANTS]
    return (*floats, *(v for v in variants if v in INT16_VARIANTS))


def quant_serves(x: Tensor, weight) -> bool:
    """Whether quant_linear takes x @ weight.T: a CPU input of a dtype it reads (float32, bf16,
    float16; float64 takes the dequantizing path) and the kernels built."""
    return (
        x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and available()
    )


def quant_linear(x: Tensor, weight, bias: Tensor | None = None, variant: str | None = None) -> Tensor:
    """x (M, K) @ dequantize(weight).T + bias for a kvlab.quant QuantizedWeight, in x's dtype."""
    return _op().quant_linear(x, *_packed(weight), bias, variant or quant_variant(weight.bits))


def quant_dequantize(weight, rows: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """float32 rows of a QuantizedWeight (all, or those `rows` indexes), into `out` when given."""
    return _op().quant_dequantize(*_packed(weight), rows, out)


def _packed(weight) -> tuple:
    """A QuantizedWeight as the quantized ops take it: codes, scales, offsets, bits, group size, K."""
    return weight.data, weight.scales, weight.offsets, weight.bits, weight.group_size, weight.in_features
