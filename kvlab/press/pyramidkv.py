"""PyramidKV (Cai et al. 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
Information Funneling", arXiv:2406.02069, Sec. 3.2).

SnapKV's scores with per-layer budgets that shrink linearly with depth. For an average budget k over
m layers: the top layer keeps k_{m-1} = k / beta, the bottom k_0 = 2k - k_{m-1}, and layer l keeps
k_0 - l (k_0 - k_{m-1}) / (m - 1) (Eq. 6-7). Each layer keeps between window + 1 and n tokens; what a
clipped layer cannot take goes to the others (`kvlab.press.budget`), so the average stays k.
Default beta = 20 (the paper's setting).

`rule="kvpress"` takes kvpress 0.5's scores (see snapkv.py) and its budgets
(`PyramidKVPress.get_layer_budget`, after KVCache-Factory's `pyramidkv_utils.py`), which need the
number n of candidate tokens: the bottom layer is clipped to n - window and the top raised so that
k_0 + k_{m-1} stays 2k (the average stays k); if the top would then keep fewer than `window` tokens,
or the bottom more than n, every layer keeps k (plain SnapKV).
"""

from dataclasses import dataclass

from kvlab.errors import ConfigError
from kvlab.press.budget import Budget
from kvlab.press.snapkv import SnapKVPress


@dataclass(slots=True)
class PyramidKVPress(SnapKVPress):
    beta: float = 20.0

    needs_mask_hook = True

    def __post_init__(self) -> None:
        SnapKVPress.__post_init__(self)
        if self.beta < 1:
            raise ConfigError(f"beta must be >= 1, got {self.beta}")

    def layer_weights(self, num_layers: int) -> tuple[float, ...] | None:
        # Eq. 6-7 over an average of 1: top 1 / beta, bottom 2 - 1 / beta, linear in between. The
        # Budget object scales them to the average and gives what layers clipped at n or at
        # min_budget() cannot take to the others, so the mean over layers is the requested budget.
        if num_layers == 1:
            return None
        top = 1.0 / self.beta
        bottom = 2.0 - top
        return tuple(bottom - layer * (bottom - top) / (num_layers - 1) for layer in range(num_layers))

    def layer_budgets(self, budget: Budget, num_layers: int, n: int) -> tuple[int, ...]:
        if self.rule == "kvpress" and num_layers > 1:
            # kvpress schedules from the unrounded average n * (1 - r) (SnapKV keeps its int()).
            ratio = budget.compression_ratio
            average = budget.tokens(n) if ratio is None else n * (1.0 - ratio)
            return tuple(self._kvpress_layer_budget(i, num_layers, average, n) for i in range(num_layers))
        return tuple(SnapKVPress.layer_budgets(self, budget, num_layers, n))

    def layer_budget(
        self, layer_idx: int, num_layers: int, budget: int, num_tokens: int | None = None
    ) -> int:
        """One layer's tokens for an average `budget` over a first forward of `num_tokens` (None: no
        clip at n); a shortcut for `Budget(max_cache_tokens=budget).for_layer(...)`."""
        n = num_tokens if num_tokens is not None else 2**62
        return Budget(max_cache_tokens=budget).for_layer(self, layer_idx, num_layers, n)

    def _kvpress_layer_budget(self, layer_idx: int, num_layers: int, budget: float, n: int) -> int:
        top = budget / self.beta
        bottom = 2 * budget - top
        if bottom >= n - self.window:
            bottom = n - self.window
            top = 2 * budget - bottom
        if not n >= bottom >= top >= self.window:
            return max(1, round(budget))
        return round(bottom - layer_idx * (bottom - top) / (num_layers - 1))
