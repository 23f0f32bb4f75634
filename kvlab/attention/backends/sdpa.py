"""Fast CPU path: gather each request's context and call torch's fused scaled_dot_product_attention;
batched decode (one new token per request) is one SDPA call over the whole padded batch.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from kvlab.attention.backends.base import PerRequestBackend, gather_context
from kvlab.attention.backends.reference import causal_mask
from kvlab.attention.backends.registry import register_backend
from kvlab.attention.metadata import AttentionMetadata


@register_backend("sdpa")
class SdpaBackend(PerRequestBackend):
    def attend(self, query: Tensor, key: Tensor, value: Tensor, scale: float) -> Tensor:
        query_len, seq_len = query.shape[0], key.shape[0]
        # SDPA's is_causal aligns the mask top-left; our queries are the *last* rows, so it is only
        # right when there is no cached context. With cached context, pass the offset mask.
        is_causal = query_len == seq_len and query_len > 1
        mask = None if is_causal or query_len == 1 else causal_mask(query_len, seq_len, query.device)
        out = F.scaled_dot_product_attention(
            query.transpose(0, 1),
            key.transpose(0, 1),
            value.transpose(0, 1),
            attn_mask=mask,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=True,
        )
        return out.transpose(0, 1)

    def forward(
        self, query: Tensor, key_cache: Tensor, value_cache: Tensor, metadata: AttentionMetadata, scale: float
    ) -> Tensor:
        if metadata.is_decode_only:
            return self._decode(query, key_cache, value_cache, metadata, scale)
        return super().forward(query, key_cache, value_cache, metadata, scale)

    def _decode(
        self, query: Tensor, key_cache: Tensor, value_cache: Tensor, metadata: AttentionMetadata, scale: float
    ) -> Tensor:
        """query (B, H, D), one token per request -> (B, H, D), in one fused SDPA call.

        A single sequence needs no mask and, when its blocks are consecutive, no copy (a view of the
        cache). A batch is gathered padded to max_seq_len and masked by seq_lens.
        """
        num_reqs, num_heads, head_dim = query.shape
        if num_reqs == 1:
            block_ids = metadata.block_tables[0].tolist()
            keys = gather_context(key_cache, block_ids, metadata.max_seq_len)[None]
            values = gather_context(value_cache, block_ids, metadata.max_seq_len)[None]
            mask = None
        else:
            num_blocks = -(-metadata.max_seq_len // metadata.block_size)
            table = metadata.block_tables[:, :num_blocks].long()
            keys = key_cache[table].flatten(1, 2)[:, : metadata.max_seq_len]  # (B, L, K, D)
            values = value_cache[table].flatten(1, 2)[:, : metadata.max_seq_len]
            key_pos = torch.arange(metadata.max_seq_len, device=query.device)
            mask = (key_pos[None, :] < metadata.seq_lens[:, None])[:, None, None, :]  # (B, 1, 1, L)
        out = F.scaled_dot_product_attention(
            query[:, :, None, :],  # (B, H, 1, D)
            keys.transpose(1, 2),  # (B, K, L, D)
            values.transpose(1, 2),
            attn_mask=mask,
            scale=scale,
            enable_gqa=True,
        )
        return out.view(num_reqs, num_heads, head_dim)
