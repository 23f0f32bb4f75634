"""Tiled attention with online softmax over the paged cache: FlashAttention-2 forward, in PyTorch.

Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning" (2023),
Algorithm 1. For each query tile Q_i (block_m rows) we stream KV tiles (block_n positions, read
straight from the pages named by the block table) and keep, per query row, a running max m, a
running denominator l and an un-normalised output O:

    m' = max(m, rowmax(S)),  P = exp(S - m'),  l' = exp(m - m') l + rowsum(P),
    O' = exp(m - m') O + P V,                  and only at the end O / l.

Deferring the 1/l rescale to the end (instead of every tile, as FlashAttention-1 did) is FA-2's
change to the inner loop. Causal: KV tiles wholly after the tile's last query position are skipped,
and only tiles crossing the diagonal are masked. GQA: the group of query heads sharing a kv head is
folded into the rows of one matmul, so K/V tiles are read once per kv head.
This is a readable CPU implementation of the algorithm (float32 accumulation), not a fast path.
"""

import torch
from torch import Tensor

from kvlab.attention.backends.base import AttentionBackend, request_spans
from kvlab.attention.backends.registry import register_backend
from kvlab.attention.metadata import AttentionMetadata


@register_backend("tiled")
class TiledBackend(AttentionBackend):
    def __init__(self, block_m: int = 64, block_n: int = 64) -> None:
        if block_m <= 0 or block_n <= 0:
            raise ValueError(f"block_m and block_n must be positive, got {block_m} and {block_n}")
        self.block_m = block_m
        self.block_n = block_n

    def forward(
        self, query: Tensor, key_cache: Tensor, value_cache: Tensor, metadata: AttentionMetadata, scale: float
    ) -> Tensor:
        num_kv_heads, head_dim = key_cache.shape[2:]
        flat_keys = key_cache.view(-1, num_kv_heads, head_dim)  # addressed by slot = block * size + offset
        flat_values = value_cache.view(-1, num_kv_heads, head_dim)
        block_size = metadata.block_size
        output = torch.empty_like(query)
        for i, (start, end, seq_len) in enumerate(request_spans(metadata)):
            positions = torch.arange(seq_len, device=query.device)
            pages = metadata.block_tables[i].long()[positions // block_size]
            slots = pages * block_size + positions % block_size
            context_len = seq_len - (end - start)
            for m0 in range(0, end - start, self.block_m):
                m1 = min(m0 + self.block_m, end - start)
                output[start + m0 : start + m1] = self._query_tile(
                    query[start + m0 : start + m1], flat_keys, flat_values, slots, context_len + m0, scale
                )
        return output

    def _query_tile(
        self,
        query: Tensor,
        flat_keys: Tensor,
        flat_values: Tensor,
        slots: Tensor,
        first_pos: int,
        scale: float,
    ) -> Tensor:
        """query (M, H, D) at positions first_pos.. -> (M, H, D); slots: the request's slot per position."""
        num_rows, num_heads, head_dim = query.shape
        num_kv_heads = flat_keys.shape[1]
        group = num_heads // num_kv_heads
        # Rows of kv head k are (query m, head-in-group g) pairs: (K, M*G, D).
        q = (query.float() * scale).view(num_rows, num_kv_heads, group, head_dim).transpose(0, 1)
        q = q.reshape(num_kv_heads, num_rows * group, head_dim)
        query_pos = torch.arange(first_pos, first_pos + num_rows, device=query.device)
        query_pos = query_pos.repeat_interleave(group)

        row_max = torch.full((num_kv_heads, num_rows * group), float("-inf"), device=query.device)
        row_sum = torch.zeros_like(row_max)
        acc = torch.zeros(num_kv_heads, num_rows * group, head_dim, device=query.device)
        kv_end = first_pos + num_rows  # causal: later keys are invisible to every row of this tile
        for n0 in range(0, kv_end, self.block_n):
            n1 = min(n0 + self.block_n, kv_end)
            keys = flat_keys[slots[n0:n1]].float().transpose(0, 1)  # (K, N, D)
            values = flat_values[slots[n0:n1]].float().transpose(0, 1)
            scores = torch.bmm(q, keys.transpose(1, 2))  # (K, M*G, N)
            if n1 - 1 > first_pos:  # the tile crosses the diagonal
                key_pos = torch.arange(n0, n1, device=query.device)
                scores.masked_fill_(key_pos[None, :] > query_pos[:, None], float("-inf"))
            # Row max is finite after the first tile (every row sees key 0), so no -inf - -inf.
            new_max = torch.maximum(row_max, scores.amax(dim=-1))
            probs = torch.exp(scores - new_max[..., None])
            correction = torch.exp(row_max - new_max)
            row_sum = row_sum * correction + probs.sum(dim=-1)
            acc = acc * correction[..., None] + torch.bmm(probs, values)
            row_max = new_max
        out = (acc / row_sum[..., None]).view(num_kv_heads, num_rows, group, head_dim).transpose(0, 1)
        return out.reshape(num_rows, num_heads, head_dim).to(query.dtype)
