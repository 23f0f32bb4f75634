"""Asymmetric round-to-nearest quantization of K/V tensors, the arithmetic every KV-cache layout shares.

KIVI (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache",
arXiv 2402.02750) observed that keys have a few outlier *channels* (fixed across tokens) while
values have no such structure. A group that mixes an outlier channel with ordinary ones wastes the
code range on the outlier, so keys are best quantized per channel (a group is one channel over G
tokens) and values per token (a group is G channels of one token). Both layouts reduce to one
primitive here: quantize groups of `group_size` consecutive elements along the last dimension;
callers transpose keys so tokens are last.

Each group stores a float16 scale and a float16 zero (the group's minimum, rounded down), so the
codes 0..2**bits - 1 cover [zero, zero + scale * qmax]. Scale and zero are rounded to their float16
storage *before* the codes are taken, and the scale is rounded up, so every element lies inside the
stored range and the round-trip error is at most half a step (scale / 2) of what is stored. int4
codes are packed two per byte (low nibble first) so the bytes saved are real.

float16 limits the magnitudes a group may hold to 65504; K/V activations of the supported models
are orders of magnitude below that.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from kvlab.errors import ConfigError

KV_BITS = (8, 4)
KV_CACHE_DTYPES = {"int8": 8, "int4": 4}
SCALE_DTYPE = torch.float16
# Bytes of one group's scale + zero.
GROUP_OVERHEAD_BYTES = 2 * torch.finfo(SCALE_DTYPE).bits // 8


@dataclass(frozen=True, slots=True)
class KVQuantSpec:
    """How K/V are stored.

    bits: 8 or 4 (int4 packs two codes per byte).
    group_size: elements sharing one scale/zero: tokens per key channel group and channels per value
        token group (KIVI's G); the channel groups of a head shorter than G use the whole head.
    residual_length: the most recent tokens kept in full precision (KIVI's R, a multiple of G):
        keys are quantized in whole groups once R full-precision tokens have accumulated, values
        one token at a time as they leave the window. The paged engine keeps no residual.
    """

    bits: int = 8
    group_size: int = 32
    residual_length: int = 32

    def __post_init__(self) -> None:
        if self.bits not in KV_BITS:
            raise ConfigError(f"KV quantization bits must be 8 or 4, got {self.bits!r}")
        for name in ("group_size", "residual_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"KV quantization {name} must be an integer >= 1, got {value!r}")
        if self.residual_length % self.group_size:
            raise ConfigError(
                f"KV quantization residual_length ({self.residual_length}) must be a multiple of "
                f"group_size ({self.group_size}): keys are quantized in whole groups of tokens"
            )

    @classmethod
    def parse(cls, value: "KVQuantSpec | str | None") -> "KVQuantSpec | None":
        """A spec, or "int8" / "int4" (defaults otherwise), or None / "auto" (no quantization)."""
        if value is None or isinstance(value, cls):
            return value
        if value == "auto":
            return None
        if value not in KV_CACHE_DTYPES:
            raise ConfigError(f"unknown KV cache dtype {value!r}; choose auto, int8 or int4")
        return cls(bits=KV_CACHE_DTYPES[value])

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def channel_group(self, head_dim: int) -> int:
        """Channels per value (per-token) group for a head of `head_dim` channels."""
        group = min(self.group_size, head_dim)
        if head_dim % group:
            raise ConfigError(f"head_dim {head_dim} is not a multiple of the KV group size {group}")
        if self.bits == 4 and head_dim % 2:
            raise ConfigError(f"int4 KV packs two channels per byte; head_dim {head_dim} is odd")
        return group

    def code_bytes(self, num_values: int) -> int:
        return num_values * self.bits // 8

    def describe(self) -> str:
        return f"int{self.bits} KV (group {self.group_size}, residual {self.residual_length})"


def quantize(x: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Groups of `group_size` along the last dim -> codes uint8 (same shape, unpacked), scale and
    zero float16 (..., n // group_size). The last dim must be a multiple of group_size."""
    *lead, n = x.shape
    if n % group_size:
        raise ValueError(f"last dim {n} is not a multiple of group_size {group_size}")
    qmax = (1 << bits) - 1
    groups = x.float().reshape(*lead, n // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    zero = _round_toward(low, down=True)
    scale = _round_toward(((high - zero.float()) / qmax).clamp(min=torch.finfo(SCALE_DTYPE).tiny), down=False)
    steps = (groups - zero.float()[..., None]) / scale.float()[..., None]
    codes = steps.round_().clamp_(0, qmax).to(torch.uint8)
    return codes.reshape(*lead, n), scale, zero


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor, dtype: torch.dtype) -> Tensor:
    """Inverse of `quantize`: codes (..., n) unpacked, scale/zero (..., n // group) -> (..., n)."""
    *lead, n = codes.shape
    groups = scale.shape[-1]
    steps = codes.reshape(*lead, groups, n // groups).float()
    x = steps * scale.float()[..., None] + zero.float()[..., None]
    return x.reshape(*lead, n).to(dtype)


def pack(codes: Tensor, bits: int) -> Tensor:
    """Codes (..., n) -> storage: int8 as is, int4 two per byte along the last dim (n even)."""
    if bits == 8:
        return codes
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack(stored: Tensor, bits: int) -> Tensor:
    if bits == 8:
        return stored
    return torch.stack((stored & 0xF, stored >> 4), dim=-1).flatten(-2)


def _round_toward(x: Tensor, down: bool) -> Tensor:
    """float32 -> float16, rounded down (toward -inf) or up, so the stored value bounds x."""
    stored = x.to(SCALE_DTYPE)
    wrong = stored.float() > x if down else stored.float() < x
    limit = torch.tensor(float("-inf") if down else float("inf"), dtype=SCALE_DTYPE, device=x.device)
    return torch.where(wrong, torch.nextafter(stored, limit), stored)
