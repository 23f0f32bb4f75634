"""Round-to-nearest quantization of one weight matrix: the baseline GPTQ and AWQ improve on.

Scales come from each group's range (absmax for symmetric, min..max for asymmetric), are rounded to
their float16 storage first, and the codes are then taken against the stored scale, so what the
kernels dequantize is exactly what the rounding chose.
"""

import torch
from torch import Tensor

from kvlab.quant.formats import QuantizedWeight, QuantSpec, pack_int4

# The largest code magnitude per bits for symmetric schemes: int8 [-127, 127] (the symmetric range,
# as gpt-fast and torchao use); int4 [-8, 7] stored +8, scaled by absmax / 7 so +-absmax are exact.
SYMMETRIC_MAX = {8: 127, 4: 7}


def grouped(weight: Tensor, group_size: int) -> Tensor:
    """(N, K) -> (N, G, group_size) float32, the last group padded by repeating the row's last column
    (a repeat changes no group's min, max or absmax)."""
    n, k = weight.shape
    groups = -(-k // group_size)
    w = weight.float()
    if groups * group_size != k:
        w = torch.cat([w, w[:, -1:].expand(n, groups * group_size - k)], dim=1)
    return w.view(n, groups, group_size)


def to_scale_storage(scale: Tensor) -> Tensor:
    """float32 scales -> float16 storage, kept non-zero where the group is not all zeros (a weight
    group below float16's range would otherwise divide by zero)."""
    tiny = torch.finfo(torch.float16).tiny
    return torch.where(scale > 0, scale.clamp(min=tiny), scale).to(torch.float16)


def quantize_weight(weight: Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest quantization of an (N, K) matrix under `spec`."""
    group_size = spec.groups_along(weight.shape[1])
    scales, offsets = scales_for(weight, spec)
    codes = codes_for(weight, scales, offsets, spec.bits, group_size)
    return from_codes(codes, scales, offsets, spec.bits, group_size)


def scales_for(weight: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor | None]:
    """The stored float16 scales (N, G) and offsets (N, G) or None that round-to-nearest picks for an
    (N, K) matrix: GPTQ and AWQ reuse them for a group or a clipped weight."""
    w = grouped(weight, spec.groups_along(weight.shape[1]))
    if spec.symmetric:
        absmax = w.abs().amax(dim=-1)
        if spec.granularity == "tensor":
            absmax = absmax.amax().expand_as(absmax)
        return to_scale_storage(absmax / SYMMETRIC_MAX[spec.bits]), None
    low, high = w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0)
    if spec.granularity == "tensor":
        low, high = low.amin().expand_as(low), high.amax().expand_as(high)
    return to_scale_storage((high - low) / 15), low.to(torch.float16)


def codes_for(weight: Tensor, scales: Tensor, offsets: Tensor | None, bits: int, group_size: int) -> Tensor:
    """The nearest codes for `weight` under the given stored scales (and offsets): int16 (N, K), in
    the stored range (int8 [-127, 127]; int4 [0, 15], symmetric ones already +8)."""
    k = weight.shape[1]
    scale = scales.float().repeat_interleave(group_size, dim=1)[:, :k]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    if offsets is not None:
        offset = offsets.float().repeat_interleave(group_size, dim=1)[:, :k]
        return torch.clamp(torch.round((weight.float() - offset) / safe), 0, 15).to(torch.int16)
    limit = SYMMETRIC_MAX[bits]
    q = torch.clamp(torch.round(weight.float() / safe), -limit - (bits == 4), limit)
    return (q + 8 if bits == 4 else q).to(torch.int16)


def from_codes(
    codes: Tensor, scales: Tensor, offsets: Tensor | None, bits: int, group_size: int
) -> QuantizedWeight:
    """Stored codes (as codes_for returns them) + scales -> the packed QuantizedWeight."""
    data = codes.to(torch.int8) if bits == 8 else pack_int4(codes)
    return QuantizedWeight(data.contiguous(), scales.contiguous(), offsets, bits, group_size, codes.shape[1])
