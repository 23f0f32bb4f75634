"""SnapKV (Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation",
arXiv:2404.14469, Sec. 4.1, Listing 1).

Score of a prefix token = attention it receives from the last `window` queries of the prompt
(the observation window; causal inside it), summed over those queries, averaged over the query heads
of a kv-head (GQA), then max-pooled over neighbouring tokens (`kernel`) so clusters are kept whole.
The observation window itself is always kept. Defaults follow the paper's released code: window 32,
kernel 5, max pooling. Compresses once, after prefill.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvlab.errors import ConfigError
from kvlab.press.base import Observations, ScorerPress, Selection, check_budget, received_attention


@dataclass(slots=True)
class SnapKVPress(ScorerPress):
    window: int = 32
    kernel: int = 5

    needs_queries = True

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ConfigError(f"window must be >= 1, got {self.window}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ConfigError(f"kernel must be odd and >= 1, got {self.kernel}")

    def keep(
        self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, obs: Observations, budget: int
    ) -> Selection:
        check_budget(budget, self.window + 1, f"{type(self).__name__} with window={self.window}")
        return ScorerPress.keep(self, layer_idx, keys, values, obs, budget)

    def num_recent(self, budget: int) -> int:
        return self.window

    def score(
        self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, obs: Observations
    ) -> torch.Tensor:
        window = min(self.window, obs.queries.shape[2])
        weights = received_attention(obs.queries[:, :, -window:], keys, obs.scaling)
        # Pool over the prefix only (the window is kept anyway), as SnapKV's Listing 1 does.
        batch, heads, n = weights.shape
        prefix = weights[..., : n - window].reshape(batch * heads, 1, n - window)
        pooled = F.max_pool1d(prefix, self.kernel, stride=1, padding=self.kernel // 2)
        return torch.cat((pooled.view(batch, heads, n - window), weights[..., n - window :]), dim=-1)
