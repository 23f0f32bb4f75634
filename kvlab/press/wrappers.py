"""Cross-cutting behaviour by wrapping any press (kvpress' composition idea, not flags).

- `KeyRerotationPress(press)`: after each eviction, kept keys are re-rotated so that their positions are
  contiguous and end at the newest token, as StreamingLLM assigns positions inside the cache
  (Xiao et al. 2023, Sec. 3.2). RoPE scores depend only on q_pos - k_pos (Su et al. 2021, Eq. 16),
  so query-key distances never exceed the cache size: needed to stream past the trained context.
- `PerHeadBudgetPress(press)`: AdaKV-style per-head budgets (Feng et al. 2024, "Ada-KV: Optimizing KV
  Cache Eviction by Adaptive Budget Allocation", arXiv:2407.11550, Alg. 1): the layer's total of
  budget * kv_heads slots goes to the top scores across all heads, after a safeguard floor of
  `alpha * budget` per head (alpha = 0.2, the paper's default).
"""

from dataclasses import dataclass

import torch

from kvlab.errors import ConfigError
from kvlab.press.base import Observations, Press, ScorerPress, Selection, check_budget
from kvlab.press.budget import Budget
from kvlab.rope import RotarySpec, rotate_keys_


@dataclass(slots=True)
class Wrapper(Press):
    press: Press

    @property
    def needs_queries(self) -> bool:
        return self.press.needs_queries

    @property
    def evicts_during_decode(self) -> bool:
        return self.press.evicts_during_decode

    @property
    def evicts_by_position(self) -> bool:
        return self.press.evicts_by_position

    @property
    def scores_candidates(self) -> bool:
        return self.press.scores_candidates

    @property
    def needs_mask_hook(self) -> bool:
        return self.press.needs_mask_hook

    def keep(self, layer_idx: int, keys, values, obs: Observations, budget: int) -> Selection:
        return self.press.keep(layer_idx, keys, values, obs, budget)

    def evict_slot(self, layer_idx: int, keys, values, obs: Observations, budget: int):
        return self.press.evict_slot(layer_idx, keys, values, obs, budget)

    def ring_slot(self, num_evicted: int, budget: int) -> int:
        return self.press.ring_slot(num_evicted, budget)

    def update_state(self, layer_idx: int, keys, obs: Observations) -> dict[str, torch.Tensor]:
        return self.press.update_state(layer_idx, keys, obs)

    def min_budget(self) -> int:
        return self.press.min_budget()

    def layer_weights(self, num_layers: int):
        return self.press.layer_weights(num_layers)

    def layer_budgets(self, budget: Budget, num_layers: int, n: int):
        return self.press.layer_budgets(budget, num_layers, n)

    def reposition(self, keys, positions, rotary: RotarySpec | None):
        return self.press.reposition(keys, positions, rotary)

    def describe(self) -> str:
        return f"{type(self).__name__}({self.press.describe()})"


@dataclass(slots=True)
class KeyRerotationPress(Wrapper):
    def reposition(self, keys, positions, rotary: RotarySpec | None):
        keys, positions = self.press.reposition(keys, positions, rotary)
        if rotary is None:
            raise ConfigError("key re-rotation needs the model's rotary spec")
        n = positions.shape[-1]
        rank = positions.argsort(dim=-1).argsort(dim=-1)
        target = positions.amax(dim=-1, keepdim=True) - (n - 1 - rank)
        rotate_keys_(keys, target - positions, rotary)  # in place: no copy of the cache per step
        positions.copy_(target)
        return keys, positions


@dataclass(slots=True)
class PerHeadBudgetPress(Wrapper):
    alpha: float = 0.2

    def __post_init__(self) -> None:
        if not isinstance(self.press, ScorerPress):
            raise ConfigError(f"per-head budgets need a scoring press, not {self.press.describe()}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")

    @property
    def evicts_during_decode(self) -> bool:
        return False  # a prefill-time allocation (AdaKV); decode appends to every head

    @property
    def evicts_by_position(self) -> bool:
        return False

    @property
    def needs_mask_hook(self) -> bool:
        return True  # padded slots of heads that keep fewer tokens are masked per head

    def keep(self, layer_idx: int, keys, values, obs: Observations, budget: int) -> Selection:
        check_budget(budget, self.min_budget(), self.describe())
        scores = self.press.protected_scores(layer_idx, keys, values, obs, budget)
        batch, heads, n = scores.shape
        floor, total = Budget.heads(budget, heads, self.alpha)
        chosen = torch.zeros_like(scores, dtype=torch.bool)
        if floor:
            chosen.scatter_(-1, scores.topk(floor, dim=-1).indices, True)
        rest = scores.masked_fill(chosen, -torch.inf).view(batch, heads * n)
        extra = rest.topk(total - floor * heads, dim=-1).indices
        chosen.view(batch, heads * n).scatter_(-1, extra, True)
        counts = chosen.sum(-1)
        width = int(counts.max())
        order = torch.arange(n, device=scores.device)
        # Chosen slots first, in ascending order; the padding beyond each head's count is masked.
        key = torch.where(chosen, order, order + n)
        indices = key.sort(dim=-1).values[..., :width] % n
        valid = torch.arange(width, device=scores.device) < counts[..., None]
        return Selection(indices, valid)
