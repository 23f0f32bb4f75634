"""What the optimized path of each bench technique is.

The baseline is always plain `model.generate()` with its default cache. A technique's optimized
path is `kvlab.generate` with the cache the technique builds (static, compressed, ...), so both
paths see identical inputs and differ only in what the technique changes.
"""

from collections.abc import Callable
from dataclasses import dataclass

from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from kvlab.bench.config import BenchConfig
from kvlab.cache import PreallocatedCache



@dataclass(frozen=True, slots=True)
class Technique:
    name: str
    description: str
    # (model, total_tokens, config) -> the cache kvlab.generate uses for one request batch
    make_cache: Callable[[PreTrainedModel, int, BenchConfig], Cache]


def _static_cache(model: PreTrainedModel, total_tokens: int, config: BenchConfig) -> Cache:
    return PreallocatedCache(model.config.num_hidden_layers, total_tokens)


TECHNIQUES: dict[str, Technique] = {
    "static-cache": Technique(
        "static-cache",
        "kvlab.generate: explicit prefill/decode loop, K/V written in place into a buffer preallocated for the request",
        _static_cache,
    ),
}


def known_techniques() -> list[str]:
    return sorted(TECHNIQUES)
