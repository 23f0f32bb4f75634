"""How many tokens a press keeps: one object resolves the ratio, the per-layer and the per-head budgets.

    budget = Budget(compression_ratio=0.5)           # or Budget(max_cache_tokens=256)
    budget.tokens(n)                                 # average tokens per layer after a first forward of n
    budget.layers(press, num_layers, n)              # every layer's budget (checked against the press)
    budget.for_layer(press, layer, num_layers, n)    # one layer's
    budget.heads(layer_budget, num_heads, alpha)     # per-head (AdaKV) floor and the layer's total

Used by `PressCache` (kvlab.press.hf), the engine (`kvlab.engine.compression.RequestPress`) and the
bench, so the three agree on every count.

Ratio: kvpress' convention, the fraction of the first forward's n tokens removed; a layer keeps
`int(n * (1 - r))`, at least 1 (floor, as kvpress' ScorerPress does).

Per layer: a press may give its layers different shares (`Press.layer_weights`, PyramidKV). Each
layer's budget lies in [press.min_budget(), n] -- below the minimum the press cannot run (SnapKV's
window + 1), above n there is nothing more to keep -- and what the clipped layers cannot take is
redistributed to the others, so the layers keep exactly `tokens(n) * num_layers` in total whenever
that is reachable (PyramidKV at n=1000, 30 layers, r=0.25 keeps 750 per layer on average; a plain
clip of the paper's linear schedule would keep 670).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvlab.errors import ConfigError

if TYPE_CHECKING:
    from kvlab.press.base import Press


@dataclass(frozen=True, slots=True)
class Budget:
    """`max_cache_tokens` per layer (the average over layers when they differ), or `compression_ratio`
    (fraction of the first forward's tokens removed, in [0, 1)); exactly one."""

    max_cache_tokens: int | None = None
    compression_ratio: float | None = None

    def __post_init__(self) -> None:
        if (self.max_cache_tokens is None) == (self.compression_ratio is None):
            raise ConfigError("give exactly one of max_cache_tokens or compression_ratio")
        tokens = self.max_cache_tokens
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            raise ConfigError(f"max_cache_tokens must be an integer >= 1, got {tokens!r}")
        ratio = self.compression_ratio
        if ratio is not None and (
            isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0
        ):
            raise ConfigError(
                f"compression_ratio is the fraction of tokens removed, in [0, 1); got {ratio!r}"
            )

    def describe(self) -> str:
        if self.max_cache_tokens is not None:
            return f"max_cache_tokens={self.max_cache_tokens}"
        return f"compression_ratio={self.compression_ratio}"

    def tokens(self, n: int) -> int:
        """Average tokens a layer keeps after a first forward of n tokens (kvpress: int(n * (1 - r)), >= 1)."""
        if self.max_cache_tokens is not None:
            return self.max_cache_tokens
        return max(1, int(n * (1.0 - self.compression_ratio)))

    def layers(self, press: Press, num_layers: int, n: int) -> tuple[int, ...]:
        """Every layer's budget for a first forward of n tokens; ConfigError when the press cannot run it."""
        budgets = tuple(press.layer_budgets(self, num_layers, n))
        if len(budgets) != num_layers:
            raise ValueError(f"{press.describe()} gave {len(budgets)} layer budgets for {num_layers} layers")
        minimum = press.min_budget()
        for layer, budget in enumerate(budgets):
            # A layer within its budget is never compressed at the first forward; a decode-evicting
            # press still runs the budget once decode fills it.
            if budget < minimum and (budget < n or press.evicts_during_decode):
                where = f"layer {layer}'s budget" if len(set(budgets)) > 1 else "a budget"
                raise ConfigError(
                    f"{press.describe()} with {self.describe()} on {n} tokens: {where} of {budget} tokens "
                    f"is too small; the press needs at least {minimum} (its protected tokens + 1)"
                )
        return budgets

    def for_layer(self, press: Press, layer: int, num_layers: int, n: int) -> int:
        return self.layers(press, num_layers, n)[layer]

    def spread(
        self, weights: Sequence[float] | None, num_layers: int, n: int, minimum: int
    ) -> tuple[int, ...]:
        """Split `tokens(n) * num_layers` over the layers in proportion to `weights` (None: evenly),
        each layer within [minimum, n]; the clipped layers' excess or shortfall goes to the others."""
        average = self.tokens(n)
        if weights is None:
            return (average,) * num_layers
        if len(weights) != num_layers or min(weights) <= 0:
            raise ValueError(f"need {num_layers} positive layer weights, got {list(weights)}")
        low, high = min(minimum, n), n
        if average < low:
            return (average,) * num_layers  # below what the press can run: `layers` says so
        total = min(average * num_layers, high * num_layers)
        return _water_fill([float(w) for w in weights], total, low, high)

    @staticmethod
    def heads(layer_budget: int, num_heads: int, alpha: float) -> tuple[int, int]:
        """Per-head budgets (AdaKV, Feng et al. 2024, arXiv:2407.11550, Alg. 1): every head keeps at least
        `int(alpha * layer_budget)` and the heads share `layer_budget * num_heads` slots. -> (floor, total)."""
        return int(alpha * layer_budget), layer_budget * num_heads


def _water_fill(weights: list[float], total: int, low: int, high: int) -> tuple[int, ...]:
    """Integers b_l in [low, high] with sum `total` (low * L <= total <= high * L), b_l close to
    clip(s * w_l, low, high) for the scale s that makes the clipped values sum to `total`."""

    def filled(scale: float) -> list[float]:
        return [min(high, max(low, scale * w)) for w in weights]

    lo, hi = 0.0, high / min(weights)  # sum(filled(lo)) <= total <= sum(filled(hi))
    for _ in range(200):  # bisection: the sum of clipped values is monotone in the scale
        mid = (lo + hi) / 2
        if math.fsum(filled(mid)) < total:
            lo = mid
        else:
            hi = mid
    exact = filled(hi)
    budgets = [min(high, max(low, math.floor(x))) for x in exact]
    # Largest remainders first: the integer budgets sum to `total` exactly.
    order = sorted(range(len(exact)), key=lambda i: exact[i] - budgets[i], reverse=True)
    missing = total - sum(budgets)
    while missing > 0:
        for i in order:
            if missing and budgets[i] < high:
                budgets[i] += 1
                missing -= 1
    while missing < 0:
        for i in reversed(order):
            if missing and budgets[i] > low:
                budgets[i] -= 1
                missing += 1
    return tuple(budgets)
