"""PyramidKV (Cai et al. 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
Information Funneling", arXiv:2406.02069, Sec. 3.2).

SnapKV's scores with per-layer budgets that shrink linearly with depth. For an average budget k over
m layers: the top layer keeps k_{m-1} = k / beta, the bottom k_0 = 2k - k_{m-1}, and layer l keeps
k_0 - l (k_0 - k_{m-1}) / (m - 1) (Eq. 6-7); every layer keeps at least its observation window + 1.
Default beta = 20 (the paper's setting).
"""

from dataclasses import dataclass

from kvlab.errors import ConfigError
from kvlab.press.snapkv import SnapKVPress


@dataclass(slots=True)
class PyramidKVPress(SnapKVPress):
    beta: float = 20.0

    needs_mask_hook = True

    def __post_init__(self) -> None:
        SnapKVPress.__post_init__(self)
        if self.beta < 1:
            raise ConfigError(f"beta must be >= 1, got {self.beta}")

    def layer_budget(self, layer_idx: int, num_layers: int, budget: int) -> int:
        if num_layers == 1:
            return budget
        top = budget / self.beta
        bottom = 2 * budget - top
        return max(self.window + 1, round(bottom - layer_idx * (bottom - top) / (num_layers - 1)))
