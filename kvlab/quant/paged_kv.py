"""Quantized KV blocks for the paged engine (`EngineConfig(kv_cache_dtype="int8" | "int4")`).

Layout: per layer, key_cache and value_cache are uint8 tensors (num_blocks, block_size, kv_heads,
row_bytes); one row holds a token's head: its codes (head_dim bytes for int8, head_dim / 2 for int4,
two per byte), then its float16 scales, then its float16 zeros, one per group of channels. Scales
and zeros are views of the rows (`row_parts`: (num_blocks, block_size, kv_heads, groups) each), so
everything that moves cache rows -- the slot scatter, a press's compaction, block gathers -- moves
a token's codes and statistics together and needs no change.

Keys are quantized per token here, not per channel as KIVI (Liu et al. 2024, arXiv 2402.02750)
does in `kvlab.quant.kv_cache`: per-channel statistics span a group of tokens, but a paged block is
written one slot at a time by whichever step computes it (chunked prefill, decode, recompute after
preemption, prefix-cache reuse), so a key group would have to stay in full precision in every block
until its last slot fills and be rewritten then. Per-token keys keep every write self-contained at
the cost of KIVI's outlier-channel protection (int8 per-token keys are close to lossless; int4 loses
more than KIVI's layout, see the results in the report).

`QuantizedPagedBackend` wraps any attention backend: `write_kv` quantizes the step's new K/V into
their slots, and `forward` dequantizes the blocks the step's requests use into a compact float cache
and runs the inner backend on it with block tables renumbered to match. Correctness first: the
dequantized copy costs one pass over the used blocks per layer per step, and the C++ paged kernel
never sees codes.
"""

import torch
from torch import Tensor

from kvlab.attention.backends.base import AttentionBackend
from kvlab.attention.metadata import AttentionMetadata
from kvlab.quant.kv_quant import (
    GROUP_OVERHEAD_BYTES,
    SCALE_DTYPE,
    KVQuantSpec,
    dequantize,
    pack,
    quantize,
    unpack,
)


def row_bytes(spec: KVQuantSpec, head_dim: int) -> int:
    """Bytes of one token's head in a quantized block: codes, then a float16 scale and zero per group."""
    groups = head_dim // spec.channel_group(head_dim)
    return spec.code_bytes(head_dim) + groups * GROUP_OVERHEAD_BYTES


def bytes_per_token(spec: KVQuantSpec, num_layers: int, num_kv_heads: int, head_dim: int) -> int:
    """Exact K+V bytes one token occupies across all layers (the block accounting's unit)."""
    return 2 * num_layers * num_kv_heads * row_bytes(spec, head_dim)


def allocate(
    spec: KVQuantSpec,
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    device: torch.device | str,
) -> list[tuple[Tensor, Tensor]]:
    """Zeroed per-layer (key_cache, value_cache) uint8 row caches."""
    shape = (num_blocks, block_size, num_kv_heads, row_bytes(spec, head_dim))
    return [
        (
            torch.zeros(shape, dtype=torch.uint8, device=device),
            torch.zeros(shape, dtype=torch.uint8, device=device),
        )
        for _ in range(num_layers)
    ]


def row_parts(rows: Tensor, spec: KVQuantSpec, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """rows (..., row_bytes) uint8 -> views: stored codes (..., code_bytes), scale and zero
    (..., groups) float16."""
    code_bytes = spec.code_bytes(head_dim)
    groups = head_dim // spec.channel_group(head_dim)
    stats = rows[..., code_bytes:].view(SCALE_DTYPE)
    return rows[..., :code_bytes], stats[..., :groups], stats[..., groups:]


def encode(x: Tensor, spec: KVQuantSpec) -> Tensor:
    """x (..., head_dim) -> rows (..., row_bytes) uint8, quantized per token in groups of channels."""
    head_dim = x.shape[-1]
    codes, scale, zero = quantize(x, spec.bits, spec.channel_group(head_dim))
    stats = torch.cat((scale, zero), dim=-1).view(torch.uint8)
    return torch.cat((pack(codes, spec.bits), stats), dim=-1)


def decode(rows: Tensor, spec: KVQuantSpec, head_dim: int, dtype: torch.dtype) -> Tensor:
    """rows (..., row_bytes) uint8 -> (..., head_dim) in `dtype`."""
    stored, scale, zero = row_parts(rows, spec, head_dim)
    return dequantize(unpack(stored, spec.bits), scale, zero, dtype)


class QuantizedPagedBackend(AttentionBackend):
    """Quantizes on write, dequantizes the used blocks on read, attends with `inner`."""

    fused_cpu_decode = False  # the fused decode op reads float blocks

    def __init__(self, inner: AttentionBackend, spec: KVQuantSpec, head_dim: int):
        self.inner = inner
        self.name = inner.name
        self.spec = spec
        self.head_dim = head_dim
        self.per_layer_metadata = inner.per_layer_metadata

    def layer_metadata(self, key_cache: Tensor, metadata: AttentionMetadata) -> AttentionMetadata:
        return self.inner.layer_metadata(key_cache, metadata)

    def write_kv(
        self, key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor, slot_mapping: Tensor
    ) -> None:
        for new, cache in ((key, key_cache), (value, value_cache)):
            num_kv_heads, width = cache.shape[-2:]
            cache.view(-1, num_kv_heads, width).index_copy_(0, slot_mapping, encode(new, self.spec))

    def forward(
        self, query: Tensor, key_cache: Tensor, value_cache: Tensor, metadata: AttentionMetadata, scale: float
    ) -> Tensor:
        used, tables = torch.unique(metadata.block_tables, return_inverse=True)
        used = used.long()
        keys = decode(key_cache[used], self.spec, self.head_dim, query.dtype)
        values = decode(value_cache[used], self.spec, self.head_dim, query.dtype)
        compact = AttentionMetadata(
            query_start_loc=metadata.query_start_loc,
            seq_lens=metadata.seq_lens,
            block_tables=tables.to(metadata.block_tables.dtype),
            slot_mapping=metadata.slot_mapping,
            max_query_len=metadata.max_query_len,
            max_seq_len=metadata.max_seq_len,
            block_size=metadata.block_size,
        )
        return self.inner.forward(query, keys, values, compact, scale)
