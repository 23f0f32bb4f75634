"""Token sampling: greedy, temperature, top-k and top-p (nucleus), seeded, without host syncs."""

import math
import numbers
from dataclasses import dataclass

import torch

from kvlab.errors import ConfigError
from kvlab.kernels import cpu as cpu_kernels


@dataclass(frozen=True, slots=True)
class SamplingConfig:
    """temperature 0 means greedy (argmax); top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        # Checked here, where the request is made: a value that only failed inside a step would fail
        # the whole batch that step runs, other requests included.
        if not _is_real(self.temperature) or not 0.0 <= self.temperature < math.inf:
            raise ConfigError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ConfigError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ConfigError(f"seed must be an integer or None, got {self.seed!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def make_generator(self, device: torch.device) -> torch.Generator | None:
        if self.is_greedy or self.seed is None:
            return None
        # Any integer seeds a generator: torch takes 64 bits, so the seed is reduced modulo 2^64 (the
        # server seeds choice i of a request with seed + i, which may step past 2^64 - 1).
        return torch.Generator(device=device).manual_seed(self.seed % 2**64)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def sample(
    logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """logits: (batch, vocab) -> token ids (batch,)."""
    if config.is_greedy:
        return greedy(logits)
    # Shifted by each row's maximum before the division, so a temperature near 0 sends the others to
    # -inf (sampling then picks among the maxima, greedy's limit) instead of overflowing to inf - inf.
    logits = logits.float()
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / config.temperature
    if config.top_k > 0 and config.top_k < logits.shape[-1]:
        kth = torch.topk(logits, config.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        # Keep the smallest prefix of the sorted distribution whose mass reaches top_p (Holtzman et al. 2020);
        # the most likely token always survives.
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= config.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """logits (batch, vocab) -> the first index of each row's maximum. On CPU kvlab's vectorised op
    (kvlab/kernels/argmax.cpp says what it saves): torch's index-returning reductions run one scalar
    chain per row."""
    if logits.dim() == 2 and cpu_kernels.handles(logits):
        return cpu_kernels.argmax_rows(logits)
    return logits.max(dim=-1).indices
