"""H2O: heavy hitters + recent tokens (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient
Generative Inference of Large Language Models", NeurIPS 2023, arXiv:2306.14048, Algorithm 1).

Score of a token = attention it has received, accumulated over every query so far
(sum_i softmax(q_i K^T / sqrt(d))_j, Sec. 4.2), averaged over the query heads sharing a kv-head (GQA).
Defaults: half the budget for heavy hitters, half for the most recent tokens (`heavy_ratio=0.5`, the
paper's main setting). Evicts one token per decode step, as Algorithm 1 does. One difference keeps the
cache within budget: step i attends over the kept set S_i rather than S_{i-1} + {i}; the scores that
choose S_i include step i's attention over S_{i-1} + {i} as in the paper.
"""

from dataclasses import dataclass

import torch

from kvlab.errors import ConfigError
from kvlab.press.base import Observations, ScorerPress, received_attention


@dataclass(slots=True)
class H2OPress(ScorerPress):
    heavy_ratio: float = 0.5

    needs_queries = True
    evicts_during_decode = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.heavy_ratio <= 1.0:
            raise ConfigError(f"heavy_ratio must be in [0, 1], got {self.heavy_ratio}")

    def num_recent(self, budget: int) -> int:
        return budget - round(self.heavy_ratio * budget)

    def update_state(self, layer_idx: int, keys: torch.Tensor, obs: Observations) -> dict[str, torch.Tensor]:
        received = received_attention(obs.queries, keys, obs.scaling)  # (batch, kv_heads, n)
        old = obs.state.get("received")
        if old is not None:
            received[..., : old.shape[-1]] += old
        return {"received": received}

    def score(
        self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, obs: Observations
    ) -> torch.Tensor:
        return obs.state["received"]
