"""Matmuls and lookups with a QuantizedWeight: the C++ kernel for decode-sized CPU batches, and a
tile-at-a-time dequantization into torch's float GEMM for the rest (prefill, GPUs).

A prefill multiplies hundreds of rows by each weight, so it is bound by arithmetic, not by the
weight's bytes: dequantizing a slab of output rows into float and running the float GEMM costs a
small fraction of the GEMM, and bounding the slab keeps the temporary small (the LM head of SmolLM2
is 49,152 x 576: 108 MiB in float32 at once, 8 MiB per slab).
"""

import threading

import torch
import torch.nn.functional as F
from torch import Tensor

from kvlab.kernels import cpu as cpu_kernels
from kvlab.quant.formats import QuantizedWeight

KERNEL_MAX_ROWS = 32  # the skinny regime the quantized kernel serves; beyond it the float GEMM wins
SLAB_ELEMENTS = 2 << 20  # weight elements dequantized at once on the float path (8 MiB in float32)


def quantized_linear(x: Tensor, weight: QuantizedWeight, bias: Tensor | None = None) -> Tensor:
    """x (..., K) @ dequantize(weight).T (+ bias), in x's dtype."""
    rows = x.reshape(-1, x.shape[-1])
    if not cpu_kernels.quant_serves(rows, weight):
        out = _slab_linear(rows, weight, bias)
    elif rows.shape[0] <= KERNEL_MAX_ROWS:
        out = cpu_kernels.quant_linear(rows, weight, bias)
    elif cpu_kernels.quant_variant() in cpu_kernels.INTEGER_VARIANTS:
        # An integer variant rounds every input row to int8: a prefill takes it too, in slices of rows,
        # so a row's result does not depend on how many rows share its step (engine = kvlab.generate).
        out = torch.cat(
            [cpu_kernels.quant_linear(part, weight, bias) for part in rows.split(KERNEL_MAX_ROWS)]
        )
    else:
        out = _slab_linear(rows, weight, bias)
    return out.view(*x.shape[:-1], weight.out_features)


def _slab_linear(x: Tensor, weight: QuantizedWeight, bias: Tensor | None) -> Tensor:
    n, k = weight.out_features, weight.in_features
    slab = max(1, SLAB_ELEMENTS // k)
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    for start in range(0, n, slab):
        rows = slice(start, min(n, start + slab))
        dense = dequantize(weight, x.dtype, rows, reuse_buffer=True)
        out[:, rows] = F.linear(x, dense, None if bias is None else bias[rows])
    return out


# One float32 slab per thread, reused by every slab of every prefill: a fresh 8 MiB tensor per slab is
# returned to the OS when freed wherever the allocator maps large blocks (glibc above its mmap
# threshold), and faulting its pages in again costs about as much as the dequantization itself.
_slabs = threading.local()


def _slab_buffer(rows: int, columns: int) -> Tensor:
    buffer = getattr(_slabs, "buffer", None)
    if buffer is None or buffer.numel() < rows * columns:
        buffer = _slabs.buffer = torch.empty(max(rows * columns, SLAB_ELEMENTS))
    return buffer[: rows * columns].view(rows, columns)


def dequantize(
    weight: QuantizedWeight,
    dtype: torch.dtype,
    rows: slice | Tensor | None = None,
    reuse_buffer: bool = False,
) -> Tensor:
    """The float rows of `weight` (all, a slice or an index tensor), by the C++ op where it runs.
    reuse_buffer: a float32 slice may come back in this thread's slab buffer (valid until the next call)."""
    if weight.device.type == "cpu" and cpu_kernels.available():
        out = None
        if isinstance(rows, slice):
            if reuse_buffer and dtype == torch.float32:
                out = _slab_buffer(rows.stop - rows.start, weight.in_features)
            rows = torch.arange(rows.start, rows.stop)
        return cpu_kernels.quant_dequantize(weight, rows, out).to(dtype)
    return weight.dequantize(dtype, rows)


def quantized_embedding(input_ids: Tensor, weight: QuantizedWeight, dtype: torch.dtype) -> Tensor:
    """The embedding rows of `input_ids`, dequantized: only the looked-up rows are touched."""
    flat = input_ids.reshape(-1)
    return dequantize(weight, dtype, flat).view(*input_ids.shape, weight.in_features)
