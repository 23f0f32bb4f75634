"""Random press: keep a uniformly random subset per kv-head (the control every method must beat).

Seeded per layer (`seed + layer_idx`), so runs are reproducible. Compresses after prefill.
"""

from dataclasses import dataclass

import torch

from kvlab.press.base import Observations, ScorerPress


@dataclass(slots=True)
class RandomPress(ScorerPress):
    seed: int = 0

    def score(
        self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, obs: Observations
    ) -> torch.Tensor:
        generator = torch.Generator(device=keys.device).manual_seed(self.seed + layer_idx)
        return torch.rand(keys.shape[:-1], generator=generator, device=keys.device)
