"""Quantized weight storage: what a quantizer produces, a kernel reads and a checkpoint saves.

One format covers every weight-only scheme here (RTN, GPTQ, AWQ, GGUF Q4_0 / Q4_1 / Q8_0):

    w[n, k] = q[n, k] * scales[n, g] + offsets[n, g]        g = k // group_size

- 8 bits: `data` is int8 (N, K), q in [-127, 127], no offsets (symmetric).
- 4 bits: `data` is uint8 (N, Kp / 2) with Kp = K rounded up to 32, q in [0, 15], two per byte. Within
  each block of 32 columns, byte j holds column j in its low nibble and column j + 16 in its high one
  (GGUF's Q4_0 / Q4_1 block layout, so those load without reshuffling, and one 16-byte load plus a
  shift and a mask gives 32 consecutive columns). Symmetric int4 has no `offsets`: q is stored with
  +8, and the kernels use offset = -8 * scale (GGUF Q4_0 does the same).

Scales and offsets are float16 (llama.cpp's choice: at 32-column groups float32 would add 2 bits per
weight, float16 adds 1; GGUF's own scales are float16, so they load exactly). `group_size` is a
multiple of 32, or K (one group per output row: "per channel"); a per-tensor scale is stored per row,
all equal. The last group of a row may be shorter (SmolLM2's K = 576 is 4.5 groups of 128).
"""

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from kvlab.errors import ConfigError

BLOCK = 32  # columns per packed int4 block; int4 group sizes are multiples of it
GRANULARITIES = ("tensor", "channel", "group")


@dataclass(frozen=True, slots=True)
class QuantSpec:
    """How to quantize a weight: `bits` 8 or 4; one scale per tensor, per output channel, or per
    `group_size` columns; `symmetric` (zero-centred) or asymmetric (a zero point per group)."""

    bits: int = 8
    granularity: str = "channel"
    group_size: int = 128
    symmetric: bool = True

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ConfigError(f"quantization bits must be 4 or 8, got {self.bits}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(
                f"unknown quantization granularity {self.granularity!r}; choose one of {', '.join(GRANULARITIES)}"
            )
        if self.granularity == "group" and (self.group_size < BLOCK or self.group_size % BLOCK):
            raise ConfigError(f"group_size must be a positive multiple of {BLOCK}, got {self.group_size}")
        if self.bits == 8 and not self.symmetric:
            raise ConfigError("int8 weights are symmetric here (int8 asymmetric buys nothing at 8 bits)")

    @property
    def name(self) -> str:
        parts = [f"int{self.bits}"]
        if self.granularity == "group":
            parts.append(f"g{self.group_size}")
        elif self.granularity == "tensor":
            parts.append("tensor")
        if not self.symmetric:
            parts.append("asym")
        return "-".join(parts)

    def groups_along(self, columns: int) -> int:
        """Columns per group for a row of `columns` values."""
        return min(self.group_size, columns) if self.granularity == "group" else columns

    @classmethod
    def parse(cls, text: str) -> "QuantSpec":
        """'int8', 'int8-tensor', 'int8-g32', 'int4-g128', 'int4-g64-asym', 'int4' (= per channel)."""
        parts = text.strip().lower().split("-")
        try:
            bits = {"int8": 8, "int4": 4}[parts[0]]
        except KeyError:
            raise ConfigError(
                f"unknown weight quantization {text!r}; e.g. int8, int4-g128, int4-g64-asym"
            ) from None
        granularity, group_size, symmetric = "channel", 128, True
        seen: set[str] = set()
        for part in parts[1:]:
            if part == "asym":
                kind, symmetric = "asym", False
            elif part == "tensor":
                kind, granularity = "granularity", "tensor"
            elif part.startswith("g") and part[1:].isascii() and part[1:].isdigit():
                kind, granularity, group_size = "granularity", "group", int(part[1:])
            else:
                raise ConfigError(f"unknown part {part!r} in weight quantization {text!r}")
            if kind in seen:  # int4-g64-g128, int4-tensor-g128: which one was meant?
                raise ConfigError(f"weight quantization {text!r} gives its {kind} twice")
            seen.add(kind)
        return cls(bits, granularity, group_size, symmetric)


@dataclass(slots=True)
class QuantizedWeight:
    """A quantized (N, K) matrix; see the module docstring for the layout."""

    data: Tensor
    scales: Tensor  # float16 (N, G)
    offsets: Tensor | None  # float16 (N, G), or None (symmetric)
    bits: int
    group_size: int
    in_features: int

    def __post_init__(self):
        n, groups = self.scales.shape
        expected = -(-self.in_features // self.group_size)
        if groups != expected:
            raise ValueError(f"{groups} scale groups for K={self.in_features}, group {self.group_size}")
        if self.bits == 8:
            if self.data.dtype != torch.int8 or tuple(self.data.shape) != (n, self.in_features):
                raise ValueError(
                    f"int8 data must be int8 ({n}, {self.in_features}), got {self.data.dtype} {tuple(self.data.shape)}"
                )
        elif self.data.dtype != torch.uint8 or tuple(self.data.shape) != (
            n,
            packed_columns(self.in_features),
        ):
            raise ValueError(f"int4 data must be uint8 ({n}, {packed_columns(self.in_features)})")
        if self.group_size != self.in_features and self.group_size % BLOCK:
            raise ValueError(f"group_size {self.group_size} is neither K nor a multiple of {BLOCK}")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.scales.shape[0], self.in_features)

    @property
    def out_features(self) -> int:
        return self.scales.shape[0]

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        parts = [self.data, self.scales] + ([self.offsets] if self.offsets is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.data, self.scales, self.offsets) if t is not None]

    def codes(self) -> Tensor:
        """The integer codes q as int16 (N, K) (unpacked for 4 bits)."""
        if self.bits == 8:
            return self.data.to(torch.int16)
        return unpack_int4(self.data, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: slice | Tensor | None = None) -> Tensor:
        """The float matrix (or the selected rows), computed in float32 then cast."""
        data = self.data if rows is None else self.data[rows]
        scales = self.scales if rows is None else self.scales[rows]
        offsets = None if self.offsets is None else (self.offsets if rows is None else self.offsets[rows])
        q = data.float() if self.bits == 8 else unpack_int4(data, self.in_features).float()
        scale = scales.float().repeat_interleave(self.group_size, dim=1)[:, : self.in_features]
        if offsets is not None:
            offset = offsets.float().repeat_interleave(self.group_size, dim=1)[:, : self.in_features]
        elif self.bits == 4:
            offset = -8.0 * scale
        else:
            offset = None
        w = q * scale if offset is None else torch.addcmul(offset, q, scale)
        return w.to(dtype)

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        return replace(
            self,
            data=self.data.to(device),
            scales=self.scales.to(device),
            offsets=None if self.offsets is None else self.offsets.to(device),
        )

    @staticmethod
    def cat(weights: list["QuantizedWeight"]) -> "QuantizedWeight":
        """Stack along the output rows (a fused q|k|v or gate|up matrix); same K, bits and groups."""
        first = weights[0]
        for w in weights[1:]:
            if (w.bits, w.group_size, w.in_features, w.offsets is None) != (
                first.bits,
                first.group_size,
                first.in_features,
                first.offsets is None,
            ):
                raise ValueError("only weights quantized alike can be joined")
        offsets = None if first.offsets is None else torch.cat([w.offsets for w in weights])
        return QuantizedWeight(
            torch.cat([w.data for w in weights]),
            torch.cat([w.scales for w in weights]),
            offsets,
            first.bits,
            first.group_size,
            first.in_features,
        )

    def select_rows(self, index: Tensor) -> "QuantizedWeight":
        """The output rows `index` picks, in that order (a row's codes and scales move together)."""
        return QuantizedWeight(
            self.data[index].contiguous(),
            self.scales[index].contiguous(),
            None if self.offsets is None else self.offsets[index].contiguous(),
            self.bits,
            self.group_size,
            self.in_features,
        )

    def split(self, sizes: list[int]) -> list["QuantizedWeight"]:
        """Row blocks of the given sizes (the inverse of cat)."""
        parts, start = [], 0
        for size in sizes:
            rows = slice(start, start + size)
            parts.append(
                QuantizedWeight(
                    self.data[rows],
                    self.scales[rows],
                    None if self.offsets is None else self.offsets[rows],
                    self.bits,
                    self.group_size,
                    self.in_features,
                )
            )
            start += size
        return parts


def packed_columns(in_features: int) -> int:
    """Bytes per packed int4 row: K rounded up to whole 32-column blocks, two columns per byte."""
    return -(-in_features // BLOCK) * BLOCK // 2


def pack_int4(q: Tensor) -> Tensor:
    """int (N, K) codes in [0, 15] -> uint8 (N, packed_columns(K)), blocks of 32 as in the docstring."""
    n, k = q.shape
    padded = torch.zeros(n, packed_columns(k) * 2, dtype=torch.uint8, device=q.device)
    padded[:, :k] = q.to(torch.uint8)
    blocks = padded.view(n, -1, 2, BLOCK // 2)  # (N, blocks, low half | high half, 16)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, -1)


def unpack_int4(data: Tensor, in_features: int) -> Tensor:
    """The inverse of pack_int4: int16 (N, K)."""
    n = data.shape[0]
    blocks = data.view(n, -1, BLOCK // 2)
    low, high = blocks & 0x0F, blocks >> 4
    return torch.stack([low, high], dim=2).reshape(n, -1)[:, :in_features].to(torch.int16)
