"""Streaming PPL of a StreamingLLM ring, computed a chunk of tokens at a time.

Token by token, a ring of `budget` slots with `n_sink` sinks (Xiao et al. 2023) decodes token t with
the keys of tokens {0..n_sink-1} and {t-W+1..t}, W = budget - n_sink (all of 0..t before the ring
fills). Which keys a token sees depends only on t, never on what was evicted for other tokens, so
every token's attention is a fixed band of the causal mask plus the sink columns, and a chunk of C
tokens can be scored in one forward: C-row matmuls instead of C matrix-vector products, the same
arithmetic with the weights read once per chunk instead of once per token.

Positions: window keys sit at their true positions. With re-rotation (KeyRerotationPress), the ring
moves sink i to position t - (budget - 1) + i once it is full (kvlab/native_press.py); RoPE scores
depend only on q_pos - k_pos (Su et al. 2021, Eq. 16), so the sink scores are taken with the query
moved back by t - (budget - 1) instead, sinks at their true positions. Scores are float32.

`tests/bench/test_banded_ring.py` checks the NLLs equal the token-by-token ring's.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from kvlab.attention.backends.base import AttentionBackend
from kvlab.attention.metadata import AttentionMetadata
from kvlab.models.native import build_engine_model
from kvlab.press.base import Press
from kvlab.press.streaming_llm import StreamingLLMPress
from kvlab.press.wrappers import KeyRerotationPress
from kvlab.rope import RotarySpec, delta_tables, rotate_by_

CHUNK_TOKENS = 256


def ring_layout(press: Press | None) -> tuple[int, bool] | None:
    """(n_sink, rerotate) for a plain StreamingLLM ring (optionally re-rotated), else None."""
    rerotate = isinstance(press, KeyRerotationPress)
    inner = press.press if rerotate else press
    if type(inner) is not StreamingLLMPress:
        return None
    return inner.n_sink, rerotate


class BandedRingAttention(AttentionBackend):
    """Attention of a chunk of consecutive queries (one request, the text so far in one block) over
    exactly the keys the ring would hold when each query's token is decoded."""

    name = "banded-ring"

    def __init__(self, budget: int, n_sink: int, rerotate: bool, rotary: RotarySpec):
        self.budget, self.n_sink, self.rerotate, self.rotary = budget, n_sink, rerotate, rotary

    def forward(
        self, query: Tensor, key_cache: Tensor, value_cache: Tensor, metadata: AttentionMetadata, scale: float
    ) -> Tensor:
        num_queries, num_heads, head_dim = query.shape
        num_kv_heads = key_cache.shape[-2]
        end = metadata.max_seq_len
        t = torch.arange(end - num_queries, end, device=query.device)  # the queries' positions
        window = self.budget - self.n_sink
        first = max(0, end - num_queries - window + 1)  # the earliest window key of the chunk
        keys = key_cache.view(-1, num_kv_heads, head_dim)
        values = value_cache.view(-1, num_kv_heads, head_dim)
        n_sink = min(self.n_sink, end)
        key_pos = torch.arange(first, end, device=query.device)
        # Window columns: j in [max(n_sink, t - W + 1), t]; sink columns: i <= t.
        window_start = torch.clamp(t - window + 1, min=self.n_sink)
        window_mask = (key_pos[None] <= t[:, None]) & (key_pos[None] >= window_start[:, None])
        sink_mask = torch.arange(n_sink, device=query.device)[None] <= t[:, None]
        q = query.float()
        sink_query = q
        if self.rerotate and n_sink:
            delta = torch.clamp(t, max=self.budget - 1) - t  # <= 0: the query moved back, not the sinks
            cos, sin = delta_tables(delta, self.rotary)
            sink_query = rotate_by_(q.clone(), q, cos[:, None], sin[:, None], self.rotary.rotary_dim)
        group = num_heads // num_kv_heads
        k_all = torch.cat([keys[:n_sink], keys[first:end]]).float().repeat_interleave(group, dim=1)
        v_all = torch.cat([values[:n_sink], values[first:end]]).float().repeat_interleave(group, dim=1)
        # (heads, queries, keys): sink columns scored with the sink query, window columns with q.
        scores = (
            torch.cat(
                [
                    torch.einsum("qhd,khd->hqk", sink_query, k_all[:n_sink]),
                    torch.einsum("qhd,khd->hqk", q, k_all[n_sink:]),
                ],
                dim=-1,
            )
            * scale
        )
        mask = torch.cat([sink_mask, window_mask], dim=-1)
        probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        return torch.einsum("hqk,khd->qhd", probs, v_all).to(query.dtype)


@torch.inference_mode()
def banded_ring_logprobs(
    model,
    ids: Tensor,
    budget: int,
    n_sink: int,
    rerotate: bool,
    on_step: Callable[[int], None] | None = None,
    chunk_tokens: int | None = None,
) -> tuple[Tensor, int]:
    """(NLL (float64) of ids[0, 1:] under the ring, the ring's K+V bytes), scored chunk by chunk (default
    CHUNK_TOKENS) on the engine-native twin; on_step(t) after each scored token t, as streaming_ppl's
    token loop calls it."""
    chunk_tokens = chunk_tokens or CHUNK_TOKENS
    from kvlab.bench.eval.streaming_ppl import _nll

    engine_model = build_engine_model(model, fuse_projections=False)
    num_tokens = ids.shape[1]
    engine_model.rotary.reserve(num_tokens)
    # The text's K/V at true positions, one block; the band reads only sinks + the last W + chunk rows.
    kv_caches = engine_model.allocate_kv_caches(num_blocks=1, block_size=num_tokens)
    backend = BandedRingAttention(budget, n_sink, rerotate, engine_model.rotary.spec)
    nll = torch.empty(num_tokens - 1, dtype=torch.float64)
    for start in range(0, num_tokens - 1, chunk_tokens):
        end = min(start + chunk_tokens, num_tokens - 1)
        metadata = AttentionMetadata.from_lists([end - start], [end], [[0]], num_tokens, ids.device)
        hidden = engine_model(
            ids[0, start:end], torch.arange(start, end, device=ids.device), kv_caches, metadata, backend
        )
        nll[start:end] = _nll(engine_model.compute_logits(hidden)[None], ids[:, start + 1 : end + 1])
        for t in range(start, end) if on_step is not None else ():
            on_step(t)
    return nll, engine_model.kv_bytes_per_token() * budget
