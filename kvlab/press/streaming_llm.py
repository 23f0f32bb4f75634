"""StreamingLLM: attention sinks + a recent window (Xiao et al. 2023, "Efficient Streaming Language
Models with Attention Sinks", arXiv:2309.17453, Sec. 3.2).

Keeps the `n_sink` first tokens (default 4, the paper's choice) and the most recent
`budget - n_sink` tokens; evicts during decode so the cache never exceeds its budget. During decode
the window is a ring buffer: the slot to overwrite is known without looking at any tensor, so a step
costs O(1) copies. For streaming past the trained context wrap it in `KeyRerotationPress`, which
assigns positions inside the cache as the paper does (Sec. 3.2, "positional encoding").
"""

from dataclasses import dataclass

import torch

from kvlab.errors import ConfigError
from kvlab.press.base import Observations, ScorerPress


@dataclass(slots=True)
class StreamingLLMPress(ScorerPress):
    n_sink: int = 4

    evicts_during_decode = True
    evicts_by_position = True
    scores_candidates = False

    def __post_init__(self) -> None:
        if self.n_sink < 0:
            raise ConfigError(f"n_sink must be >= 0, got {self.n_sink}")

    def score(
        self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, obs: Observations
    ) -> torch.Tensor:
        return obs.positions.float()  # recency; sinks are protected by ScorerPress

    def evict_slot(
        self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, obs: Observations, budget: int
    ) -> int:
        return self.ring_slot(obs.num_evicted, budget)

    def ring_slot(self, num_evicted: int, budget: int) -> int:
        # Slots are in position order after every compaction: [sinks | window]. The oldest window
        # token is the one written longest ago, so overwriting cycles through the window. The budget
        # was checked against min_budget() (n_sink + 1) when it was resolved (`Budget.layers`).
        return self.n_sink + num_evicted % (budget - self.n_sink)
