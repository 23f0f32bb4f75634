"""Key-norm press (Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache
Compression", EMNLP 2024, arXiv:2406.11430): keys with a low L2 norm draw high attention, so keep
the `budget` lowest-norm keys per kv-head. Compresses after prefill; needs no queries.
"""

from dataclasses import dataclass

import torch

from kvlab.press.base import Observations, ScorerPress


@dataclass(slots=True)
class KnormPress(ScorerPress):
    def score(
        self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, obs: Observations
    ) -> torch.Tensor:
        return -keys.float().norm(dim=-1)
