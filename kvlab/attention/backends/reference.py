"""Ground truth: dense softmax attention with an explicit causal mask, in float32, one request at a time.

Deliberately simple and slow; every other backend is tested against it.
"""

import torch
from torch import Tensor

from kvlab.attention.backends.base import PerRequestBackend
from kvlab.attention.backends.registry import register_backend


def causal_mask(query_len: int, seq_len: int, device: torch.device) -> Tensor:
    """(query_len, seq_len) bool, True where allowed: query j sits at position seq_len - query_len + j."""
    query_pos = torch.arange(seq_len - query_len, seq_len, device=device)
    return torch.arange(seq_len, device=device)[None, :] <= query_pos[:, None]


@register_backend("reference")
class ReferenceBackend(PerRequestBackend):
    def attend(self, query: Tensor, key: Tensor, value: Tensor, scale: float) -> Tensor:
        num_heads, num_kv_heads = query.shape[1], key.shape[1]
        group = num_heads // num_kv_heads
        key = key.float().repeat_interleave(group, dim=1)  # (L, H, D)
        value = value.float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", query.float(), key) * scale
        mask = causal_mask(query.shape[0], key.shape[0], query.device)
        probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        return torch.einsum("hqk,khd->qhd", probs, value).to(query.dtype)
