"""The press contract: which cached tokens to keep, as a pure tensor function.

A press never imports transformers or the engine. The cache that runs it (`kvlab.press.hf.PressCache`
on the Hugging Face path) hands it the candidate K/V of one layer plus `Observations` and gets back
the kept slots per kv-head. Shapes used throughout:

    keys, values:  (batch, kv_heads, n, head_dim)   candidates, in cache-slot order
    queries:       (batch, q_heads, q_len, head_dim) post-RoPE queries of the current forward
    positions:     (batch, kv_heads, n)              RoPE position each candidate key carries
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kvlab.press.budget import Budget

from kvlab.rope import RotarySpec


@dataclass(slots=True)
class Observations:
    """What a press may look at for one layer and one forward.

    `num_new` trailing candidates are the tokens of the current forward; `state` holds per-slot
    running statistics (each (batch, kv_heads, n_old)) that the cache keeps aligned with its slots.
    """

    positions: torch.Tensor
    num_new: int
    queries: torch.Tensor | None = None
    scaling: float = 1.0
    rotary: RotarySpec | None = None
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    num_evicted: int = 0  # single-slot decode evictions since the last compaction (ring-buffer presses)


@dataclass(frozen=True, slots=True)
class Selection:
    """Kept slots per kv-head, ascending: indices (batch, kv_heads, k).

    `valid` (same shape, bool) is set only when heads keep different counts (per-head budgets): the
    row is padded to the largest count and padded entries are masked out of attention.
    """

    indices: torch.Tensor
    valid: torch.Tensor | None = None


class Press(ABC):
    """Base press. Subclasses implement `keep`; the class attributes declare what the cache must do.

    needs_queries: the cache must observe post-RoPE queries (installs hooks, see `PressCache.hooks`).
    evicts_during_decode: evict one token per decode step once the cache is full (StreamingLLM, H2O,
        TOVA); otherwise the press compresses only when a multi-token forward overflows the budget
        (prefill), and decode appends freely.
    evicts_by_position: the decode victim depends only on how many tokens were evicted since the
        last compaction (`ring_slot`), so a paged engine can name it without reading K/V.
    """

    needs_queries: bool = False
    evicts_during_decode: bool = False
    evicts_by_position: bool = False
    needs_mask_hook: bool = False  # layers or heads hold different lengths: attention masks need fixing
    scores_candidates: bool = True  # False: evict_slot ignores keys, so the cache skips concatenating them

    @abstractmethod
    def keep(
        self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, obs: Observations, budget: int
    ) -> Selection:
        """Choose `budget` of the n candidates per kv-head (n > budget)."""

    def evict_slot(
        self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, obs: Observations, budget: int
    ) -> torch.Tensor | int:
        """The one slot to free for a decode step on a full cache: (batch, kv_heads) or an int for all.

        Candidates are the `budget` cached slots plus the new token (last); the new token is always
        kept for its own step. Default: whichever old slot `keep` drops.
        """
        kept = self.keep(layer_idx, keys, values, obs, budget).indices
        n = keys.shape[-2]
        return n * (n - 1) // 2 - kept.sum(-1)  # the sum of all indices minus the kept ones

    def ring_slot(self, num_evicted: int, budget: int) -> int:
        """For `evicts_by_position` presses: the slot a full cache's next token overwrites, after
        `num_evicted` such overwrites since the kept slots were last stored in position order."""
        raise NotImplementedError(f"{type(self).__name__} does not evict by position")

    def update_state(self, layer_idx: int, keys: torch.Tensor, obs: Observations) -> dict[str, torch.Tensor]:
        """Extend `obs.state` (aligned to old slots) to all n candidates. Default: no state."""
        return {}

    def min_budget(self) -> int:
        """The smallest budget this press can run: its protected tokens + 1. `Budget.layers` refuses
        less with a ConfigError before anything runs (the engine checks at add_request)."""
        return 1

    def layer_weights(self, num_layers: int) -> Sequence[float] | None:
        """Relative share of each layer in the total budget (PyramidKV); None: every layer keeps the same."""
        return None

    def layer_budgets(self, budget: Budget, num_layers: int, n: int) -> Sequence[int]:
        """Tokens each layer keeps after a first forward of n tokens. Default: `budget` spreads its
        average by `layer_weights`, within [min_budget, n]. A press with its own rule (kvpress'
        PyramidKV schedule) overrides this; `Budget.layers` checks the result either way."""
        return budget.spread(self.layer_weights(num_layers), num_layers, n, self.min_budget())

    def reposition(
        self, keys: torch.Tensor, positions: torch.Tensor, rotary: RotarySpec | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hook for wrappers that move kept keys (key re-rotation); default keeps true positions.

        keys (batch, kv_heads, n, head_dim) and positions (batch, kv_heads, n) are views of the cache's
        storage: a wrapper may update them in place and return them (no copy), or return new tensors.
        """
        return keys, positions

    def describe(self) -> str:
        fields = getattr(self, "__dataclass_fields__", {})
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name in fields)
        return f"{type(self).__name__}({args})"


class ScorerPress(Press):
    """Keep the top-`budget` scores per kv-head (kvpress' ScorerPress idea).

    Subclasses implement `score`; `n_sink` leading positions and the `num_recent` most recent
    candidates are always kept (declared protection, scored +inf).
    """

    n_sink: int = 0

    def num_recent(self, budget: int) -> int:
        return 0

    def min_budget(self) -> int:
        return self.n_sink + 1  # at least one slot beyond the sinks is chosen by score

    @abstractmethod
    def score(
        self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, obs: Observations
    ) -> torch.Tensor:
        """Importance of each candidate: (batch, kv_heads, n); higher is kept."""

    def protected_scores(
        self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, obs: Observations, budget: int
    ) -> torch.Tensor:
        scores = self.score(layer_idx, keys, values, obs).to(torch.float32, copy=True)
        n = keys.shape[-2]
        # Protection is by position rank (slots may be out of order in a ring-buffer layout).
        recent = min(self.num_recent(budget), n)
        if recent:
            scores.scatter_(-1, obs.positions.topk(recent, dim=-1).indices, math.inf)
        sinks = min(self.n_sink, n)
        if sinks:
            scores.scatter_(-1, obs.positions.topk(sinks, dim=-1, largest=False).indices, math.inf)
        return scores

    def keep(
        self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, obs: Observations, budget: int
    ) -> Selection:
        check_budget(budget, self.min_budget(), self.describe())
        scores = self.protected_scores(layer_idx, keys, values, obs, budget)
        return Selection(scores.topk(budget, dim=-1).indices.sort(dim=-1).values)

    def evict_slot(
        self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, obs: Observations, budget: int
    ) -> torch.Tensor | int:
        scores = self.protected_scores(layer_idx, keys, values, obs, budget)
        return scores[..., :-1].argmin(dim=-1)  # the new token (last) is never a candidate


def attention_weights(queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """softmax(q k^T * scaling) averaged over each kv-head's query group: (batch, kv_heads, q_len, n).

    The q_len queries are the trailing candidates, so query i sees keys j <= n - q_len + i (causal).
    Computed in float32 from observed queries; SDPA stays the model's kernel.
    """
    batch, q_heads, q_len, dim = queries.shape
    kv_heads, n = keys.shape[1], keys.shape[-2]
    grouped = queries.float().view(batch, kv_heads, q_heads // kv_heads, q_len, dim)
    logits = torch.einsum("bhgqd,bhkd->bhgqk", grouped, keys.float()) * scaling
    if q_len > 1:
        visible = (
            torch.arange(n, device=keys.device) <= torch.arange(n - q_len, n, device=keys.device)[:, None]
        )
        logits = logits.masked_fill(~visible, -math.inf)
    return logits.softmax(dim=-1).mean(dim=2)


def received_attention(
    queries: torch.Tensor, keys: torch.Tensor, scaling: float, chunk: int = 256
) -> torch.Tensor:
    """Attention each candidate receives, summed over the q_len (trailing) queries: (batch, kv_heads, n).

    Query chunks bound the memory to chunk * n scores per head (a long prefill would need q_len * n).
    """
    q_len, n = queries.shape[2], keys.shape[-2]
    total = keys.new_zeros(keys.shape[0], keys.shape[1], n, dtype=torch.float32)
    for start in range(0, q_len, chunk):
        end = min(start + chunk, q_len)
        visible = n - q_len + end  # the chunk's queries are the trailing candidates of keys[:visible]
        weights = attention_weights(queries[:, :, start:end], keys[:, :, :visible], scaling)
        total[..., :visible] += weights.sum(dim=2)
    return total


def check_budget(budget: int, minimum: int, what: str) -> None:
    from kvlab.errors import ConfigError

    if budget < minimum:
        raise ConfigError(f"{what}: budget of {budget} tokens is too small; need at least {minimum}")
