"""Measurement primitives every bench shares: repeated-sample summaries, per-token timing (the one
definition of TTFT and TPOT) and KV bytes (the one definition, exact or of a paged pool in use).

Peak memory lives in `memory.py`, the bandwidth floor in `floor.py`.
"""

import statistics
from dataclasses import dataclass, field

import torch

from kvlab.cache import kv_cache_bytes  # exact bytes of a cache's K/V tensors (the library's count)

__all__ = ["Summary", "kv_cache_bytes", "paged_kv_bytes", "synchronize", "tpot_between", "tpot_s", "ttft_s"]


@dataclass(slots=True)
class Summary:
    """Median, min and max of repeated samples, with the raw samples kept."""

    median: float
    min: float
    max: float
    samples: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, samples: list[float]) -> "Summary":
        return cls(statistics.median(samples), min(samples), max(samples), list(samples))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ttft_s(token_times: list[float]) -> float:
    """Time to first token: from the call to the first token (token_times are seconds since the call)."""
    return token_times[0]


def tpot_between(first_s: float, last_s: float, num_tokens: int) -> float:
    """Time per output token after the first: (last - first) / (tokens - 1). The first token's time is
    prefill (TTFT); counting it here would mix the two phases."""
    if num_tokens < 2:
        raise ValueError("TPOT needs at least two tokens")
    return (last_s - first_s) / (num_tokens - 1)


def tpot_s(token_times: list[float]) -> float:
    """TPOT of one request from its token timestamps (see `tpot_between`)."""
    return tpot_between(token_times[0], token_times[-1], len(token_times))


def paged_kv_bytes(blocks_in_use: int, pool_bytes: int, num_blocks: int) -> int:
    """KV bytes held by `blocks_in_use` blocks of a paged pool of `num_blocks` blocks (`pool_bytes` in all)."""
    return blocks_in_use * pool_bytes // num_blocks


def matching_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy outputs share (where a numerical difference first shows)."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def same_round_ratios(times: list[float], reference: list[float]) -> list[float]:
    """Each round's time over the reference's time in the same round (sample i of each ran in round i)."""
    return [t / r for t, r in zip(times, reference, strict=True)]
