"""TOVA: Token Omission Via Attention (Oren et al. 2024, "Transformers are Multi-State RNNs",
arXiv:2401.06104, Sec. 3.3).

At each decode step, drop the token with the lowest attention from the current query, averaged over
all heads of the layer, so every head of a layer keeps the same tokens (the paper's choice). The new
token is kept for its own step. No sinks or window are declared: TOVA has none.
"""

from dataclasses import dataclass

import torch

from kvlab.press.base import Observations, ScorerPress, attention_weights


@dataclass(slots=True)
class TOVAPress(ScorerPress):
    needs_queries = True
    evicts_during_decode = True

    def score(
        self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, obs: Observations
    ) -> torch.Tensor:
        last = attention_weights(obs.queries[:, :, -1:], keys, obs.scaling)[:, :, 0]  # (batch, kv_heads, n)
        return last.mean(dim=1, keepdim=True).expand_as(last)
