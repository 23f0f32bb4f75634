"""The quantization bench's kernel comparison: one pass over every quantized matrix a decode step
multiplies, at one input row, by kvlab's quantized GEMM and by torch's own CPU kernels for the same
format (`_weight_int8pack_mm` for int8 per channel, `_weight_int4pack_mm_for_cpu` for grouped int4:
the aten ops torchao's CPU layouts dispatch to), each checked against a float64 reference."""

import statistics
from collections.abc import Callable
from typing import Any

import torch

from kvlab.bench.kernels.runs import time_passes
from kvlab.kernels import cpu as cpu_kernels
from kvlab.models.native import build_engine_model
from kvlab.quant.formats import QuantizedWeight

KVLAB = "kvlab"


def compare_kernels(models: dict[str, Any], repeats: int) -> dict[str, Any]:
    """method -> {kernel -> seconds per pass, max error, bytes}, for every model with quantized matrices."""
    if not cpu_kernels.available():
        return {}
    result = {}
    for name, model in models.items():
        weights = [w for w in build_engine_model(model).matmul_weights() if isinstance(w, QuantizedWeight)]
        if weights:
            result[name] = _compare(weights, repeats)
    return result


def _compare(weights: list[QuantizedWeight], repeats: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    inputs = {k: torch.randn(1, k, generator=generator) for k in {w.in_features for w in weights}}
    kernels: dict[str, Callable] = {
        f"{KVLAB} {variant}": lambda x, w, v=variant: cpu_kernels.quant_linear(x, w, variant=v)
        for variant in cpu_kernels.quant_variants()
    }
    unavailable = {}
    for name, make in (("torch int8pack", _torch_int8), ("torch int4pack (bf16 input)", _torch_int4)):
        prepared, reason = make(weights)
        if prepared is None:
            unavailable[name] = reason
        else:
            kernels[name] = prepared
    errors = {name: 0.0 for name in kernels}
    for w in weights[:: max(1, len(weights) // 6)]:
        x = inputs[w.in_features]
        reference = x.double() @ w.dequantize(torch.float64).T
        scale = reference.abs().max().item() or 1.0
        for name, run in kernels.items():
            errors[name] = max(errors[name], (run(x, w).double() - reference).abs().max().item() / scale)
    samples, _, _ = time_passes(kernels, weights, inputs, repeats)  # QuantizedWeight.shape is (N, K) too
    return {
        "matrices": len(weights),
        "bytes": sum(w.nbytes for w in weights),
        "seconds": {name: statistics.median(s) for name, s in samples.items()},
        "max_relative_error": errors,
        "unavailable": unavailable,
    }


def _torch_int8(weights: list[QuantizedWeight]):
    """torch's int8 weight-only matmul: per-output-channel scales only."""
    if any(w.bits != 8 or w.group_size != w.in_features for w in weights):
        return None, "needs int8 with one scale per output channel"
    packed = {id(w): (w.data, w.scales.float().view(-1)) for w in weights}

    def run(x, w):
        data, scales = packed[id(w)]
        return torch.ops.aten._weight_int8pack_mm(x, data, scales)

    return run, ""


def _torch_int4(weights: list[QuantizedWeight]):
    """torch's grouped int4 matmul (bfloat16 input): w = (q - 8) * scale + zero per group of K columns,
    K a multiple of the group; our q * scale + offset is the same with zero = offset + 8 * scale."""
    bad = [w for w in weights if w.bits != 4 or w.in_features % w.group_size or w.group_size == w.in_features]
    if bad:
        return (
            None,
            f"needs grouped int4 with K a multiple of the group (K={bad[0].in_features}, group {bad[0].group_size})",
        )
    packed = {}
    for w in weights:
        codes = w.codes().to(torch.int32)
        scale = w.scales.float()
        offset = w.offsets.float() if w.offsets is not None else -8 * scale
        zero = offset + 8 * scale
        scales_and_zeros = torch.stack([scale.T, zero.T], dim=-1).to(torch.bfloat16).contiguous()
        packed[id(w)] = (torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1), scales_and_zeros)

    def run(x, w):
        data, scales_and_zeros = packed[id(w)]
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16), data, w.group_size, scales_and_zeros
        )
        return out.float()

    return run, ""
