"""SnapKV (Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation",
arXiv:2404.14469, Sec. 4.1, Listing 1).

Score of a prefix token = attention it receives from the last `window` queries of the prompt
(the observation window; causal inside it), summed over those queries, averaged over the query heads
of a kv-head (GQA), then max-pooled over neighbouring tokens (`kernel`) so clusters are kept whole.
The observation window itself is always kept. Defaults follow the paper's released code: window 32,
kernel 5, max pooling. Compresses once, after prefill.

`rule="kvpress"` reproduces the selection of NVIDIA kvpress 0.5 (`SnapKVPress.score`), so its
published numbers can be matched: the window queries' attention is *averaged* (not summed) per query
head, smoothed by an *average* pool (zero padding counted in the divisor at the edges, torch's
`avg_pool1d` default), then averaged over the query heads of each kv-head; the window is kept. kvpress'
default window is 64 (pass `window=64`); its budget is `int(n * (1 - ratio))`, resolved by the cache.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvlab.errors import ConfigError
from kvlab.press.base import Observations, ScorerPress, received_attention

RULES = ("paper", "kvpress")


@dataclass(slots=True)
class SnapKVPress(ScorerPress):
    window: int = 32
    kernel: int = 5
    rule: str = "paper"

    needs_queries = True

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ConfigError(f"window must be >= 1, got {self.window}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ConfigError(f"kernel must be odd and >= 1, got {self.kernel}")
        if self.rule not in RULES:
            raise ConfigError(f"rule must be one of {', '.join(RULES)}; got {self.rule!r}")

    def min_budget(self) -> int:
        """The window plus one scored token; kvpress also accepts the bare window (its PyramidKV top
        layer can keep exactly the window). Below that the kept part of the window would be arbitrary."""
        return self.window if self.rule == "kvpress" else self.window + 1

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
        if self.rule == "kvpress":
            # kvpress pools each query head, then averages the group. Both steps (and the mean over
            # the window) are linear, so pooling the group mean gives the same scores; only the
            # paper's max pool does not commute with the GQA mean.
            pooled = F.avg_pool1d(prefix / window, self.kernel, stride=1, padding=self.kernel // 2)
        else:
            pooled = F.max_pool1d(prefix, self.kernel, stride=1, padding=self.kernel // 2)
        return torch.cat((pooled.view(batch, heads, n - window), weights[..., n - window :]), dim=-1)
