"""What the CPU computes natively, for kernels that choose a precision by it.

On a CPU without bf16/fp16 instructions (e.g. AVX2-only x86), torch's half-precision kernels
convert element by element and run several times slower than float32 ones: measured on an AVX2
EPYC, a (512 x 576) @ (576 x 3072) bf16 matmul takes 131 ms against 27 ms for converting both
operands to float32 and back. Tensors stay in half precision in memory; only the arithmetic moves.
"""

import functools

import torch


@functools.cache
def _native_half(dtype: torch.dtype) -> bool:
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.ops.mkldnn._is_mkldnn_fp16_supported()


def emulated_half(x: torch.Tensor) -> bool:
    """Whether x is bf16/fp16 on a CPU with no native arithmetic for it (oneDNN's own check)."""
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and not _native_half(x.dtype)
