"""CPU kernels compiled from C++ on first use (torch.utils.cpp_extension), with torch's as fallback.

Why a kernel of our own: a decode step multiplies a few rows (one per running request) by every
weight matrix, so its cost should be the weight bytes over the memory bandwidth. Measured on a
2-core AVX2 AMD EPYC (torch 2.13.0 with MKL) over SmolLM2-135M's 30 layers and LM head, torch's
matmuls stay far from that: float32 with 1 row 62-68 ms per step and with 2-16 rows 103-175 ms
(about 4 GB/s against the 17 GB/s a plain read gets); bfloat16, which this CPU only emulates,
23-26 ms with 1 row and 128-270 ms with 8-16. The skinny GEMM (skinny_gemm.cpp) streams each weight
row once and applies it to up to four input rows from registers: in the same runs 32-34 ms (fp32)
and 18-24 ms (bf16) with 1 row, 53 ms / 51 ms with 8 and 88-101 ms with 16. MKL wins again from
about 48 rows, hence SKINNY_MAX_ROWS.

Half precision takes the kernel only where the CPU lacks native half arithmetic (kvlab.hardware):
with AMX or AVX512-BF16, oneDNN's bf16 kernels are the better choice. `KVLAB_CPU_KERNELS=0` turns
the kernels off (torch's everywhere), e.g. to measure what they bring.
"""

import functools
import hashlib
import os
import shutil
import warnings
from pathlib import Path

import torch
from torch import Tensor

from kvlab.hardware import emulated_half

SKINNY_MAX_ROWS = 32
KERNEL_DIR = Path(__file__).parent
SOURCES = [
    KERNEL_DIR / name for name in ("skinny_gemm.cpp", "paged_attention.cpp", "rms_norm.cpp", "rotary.cpp")
]
COMPILE_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]  # -fopenmp: at::parallel_for uses OpenMP


def enabled_by_env() -> bool:
    return os.environ.get("KVLAB_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


@functools.cache
def build_failure() -> str | None:
    """Build and load the kernels once per process; None when they are ready, else why not."""
    if not enabled_by_env():
        return "turned off by KVLAB_CPU_KERNELS=0"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"needs an x86 CPU with AVX2 (torch reports {capability})"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler on PATH"
    try:
        from torch.utils.cpp_extension import load

        load(
            name=f"kvlab_cpu_kernels_{_source_digest()}",
            sources=[str(path) for path in SOURCES],
            extra_cflags=COMPILE_FLAGS,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except Exception as error:  # a failed build must not stop inference: torch's kernels still work
        last_line = (str(error).strip().splitlines() or [""])[-1]
        reason = f"build failed ({type(error).__name__}: {last_line})"
        warnings.warn(f"kvlab CPU kernels unavailable, using torch's: {reason}", stacklevel=2)
        return reason
    return None


def _source_digest() -> str:
    """Names the build after its sources (headers included), so an edited kernel is rebuilt."""
    digest = hashlib.sha256()
    for path in sorted(KERNEL_DIR.glob("*.[ch]*")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def available() -> bool:
    return build_failure() is None


def describe() -> str:
    """One line for reports: which matmul kernel small-batch decode uses here."""
    failure = build_failure()
    if failure is None:
        return (
            f"kvlab C++ kernels (AVX2): skinny GEMM for matmuls of <= {SKINNY_MAX_ROWS} rows, "
            "paged decode attention, RMSNorm (fused with the residual add), RoPE"
        )
    return f"torch's matmuls only (kvlab CPU kernels: {failure})"


def ops():
    """torch.ops.kvlab, built and loaded; raises if the kernels cannot be built here."""
    failure = build_failure()
    if failure is not None:
        raise RuntimeError(f"kvlab CPU kernels are unavailable: {failure}")
    return torch.ops.kvlab


def handles(x: Tensor) -> bool:
    """Whether the row-wise kernels (RMSNorm, RoPE) take x: a float32 or bfloat16 CPU tensor."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and available()


@functools.cache
def skinny_serves(dtype: torch.dtype) -> bool:
    """Whether CPU matmuls at `dtype` take the skinny GEMM: float32, or bfloat16 the CPU only emulates."""
    emulated = dtype == torch.bfloat16 and emulated_half(torch.empty(0, dtype=dtype))
    return (dtype == torch.float32 or emulated) and available()


def takes_skinny(x: Tensor, weight: Tensor) -> bool:
    """Whether x @ weight.T goes to the skinny GEMM: few CPU rows at a dtype it serves."""
    return (
        x.device.type == "cpu"
        and x.dim() == 2
        and x.shape[0] <= SKINNY_MAX_ROWS
        and x.dtype == weight.dtype
        and weight.is_contiguous()
        and skinny_serves(x.dtype)
    )


def skinny_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (M, K) @ weight (N, K).T + bias, accumulated in float32, returned in x's dtype."""
    return ops().skinny_linear(x, weight, bias)


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


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm of the rows of x (T, hidden)."""
    return ops().rms_norm(x.contiguous(), weight, eps)


def add_rms_norm_(residual: Tensor, x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """residual += x in place (contiguous residual), then its RMSNorm."""
    return ops().add_rms_norm_(residual, x.contiguous(), weight, eps)


def rotary_(x: Tensor, cos: Tensor, sin: Tensor) -> None:
    """Rotate x (T, heads, head_dim), a view with unit last stride, in place; cos/sin (T, rotary_dim // 2)."""
    ops().rotary_(x, cos, sin)
