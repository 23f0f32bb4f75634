"""The attention backend contract, plus a second-level base for backends that gather per request.

Layout (shared with the model runner): per layer `key_cache`, `value_cache` are each
(num_blocks, block_size, num_kv_heads, head_dim). A query has shape (num_tokens, num_heads, head_dim);
num_heads is a multiple of num_kv_heads (GQA: query head h reads kv head h // (num_heads // num_kv_heads)).
"""

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from kvlab.attention.metadata import AttentionMetadata


class AttentionBackend(ABC):
    """One interface for every backend: write the step's new K/V, then attend."""

    name: str = "base"
    # Whether a CPU decode step may run as one fused op (kvlab/kernels/decode_step.cpp) that writes
    # and reads the paged cache itself, exactly as this backend's write_kv + forward would.
    fused_cpu_decode: bool = False
    # Whether layers read metadata of their own (layer_metadata is not the model's for every layer).
    per_layer_metadata: bool = False

    @classmethod
    def is_available(cls, device: torch.device) -> bool:
        """Whether this backend can run on `device` in this environment."""
        return True

    @abstractmethod
    def forward(
        self, query: Tensor, key_cache: Tensor, value_cache: Tensor, metadata: AttentionMetadata, scale: float
    ) -> Tensor:
        """query (T, H, D) -> output (T, H, D): causal attention of each request's new tokens over
        its whole context (cached + new), read from the paged cache through `metadata.block_tables`.
        The new tokens' K/V must already be in the cache (see `write_kv`)."""

    def layer_metadata(self, key_cache: Tensor, metadata: AttentionMetadata) -> AttentionMetadata:
        """The metadata the layer owning `key_cache` reads (the model's, unless a wrapper holds per-layer ones)."""
        return metadata

    def write_kv(
        self, key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor, slot_mapping: Tensor
    ) -> None:
        """Scatter key/value (T, kv_heads, D) into the caches at flat slots (T,) int64."""
        num_kv_heads, head_dim = key_cache.shape[-2:]
        key_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
        value_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)


def request_spans(metadata: AttentionMetadata) -> list[tuple[int, int, int]]:
    """(query_start, query_end, seq_len) per request, read to the host once per call."""
    starts = metadata.query_start_loc.tolist()
    return list(zip(starts[:-1], starts[1:], metadata.seq_lens.tolist(), strict=True))


def gather_context(cache: Tensor, block_ids: list[int], seq_len: int) -> Tensor:
    """One request's first seq_len cached rows: (seq_len, kv_heads, D).

    When the request's blocks are physically consecutive (the common single-sequence case) this is a
    view of the cache, no copy; otherwise the blocks are gathered.
    """
    block_size = cache.shape[1]
    block_ids = block_ids[: -(-seq_len // block_size)]
    first = block_ids[0]
    if block_ids == list(range(first, first + len(block_ids))):
        return cache.view(-1, *cache.shape[2:])[first * block_size : first * block_size + seq_len]
    index = torch.tensor(block_ids, device=cache.device)
    return cache[index].flatten(0, 1)[:seq_len]


class PerRequestBackend(AttentionBackend):
    """Backends that gather each request's context contiguously and attend with one dense call.

    Subclasses implement `attend` for one request; the causal offset is implied: the q_len queries
    are the last q_len positions of the L keys.
    """

    @abstractmethod
    def attend(self, query: Tensor, key: Tensor, value: Tensor, scale: float) -> Tensor:
        """query (q_len, H, D), key/value (L, kv_heads, D) with q_len <= L -> (q_len, H, D)."""

    def forward(
        self, query: Tensor, key_cache: Tensor, value_cache: Tensor, metadata: AttentionMetadata, scale: float
    ) -> Tensor:
        output = torch.empty_like(query)
        tables = metadata.block_tables.tolist()
        for table, (start, end, seq_len) in zip(tables, request_spans(metadata), strict=True):
            key = gather_context(key_cache, table, seq_len)
            value = gather_context(value_cache, table, seq_len)
            output[start:end] = self.attend(query[start:end], key, value, scale)
        return output
