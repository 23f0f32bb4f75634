"""What the optimized path of each bench technique is.

The baseline is always plain `model.generate()` with its default cache. A technique's optimized
path is `kvlab.generate` with the cache the technique builds (static, compressed, ...), so both
paths see identical inputs and differ only in what the technique changes.
"""

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from kvlab.bench.core.config import BenchConfig
from kvlab.cache import PreallocatedCache
from kvlab.errors import ConfigError


def _no_hooks(cache: Cache, model: PreTrainedModel) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def _no_validation(config: BenchConfig) -> None:
    if config.press is not None:
        raise ConfigError(f"technique {config.technique!r} takes no 'press' section")


@dataclass(frozen=True, slots=True)
class Technique:
    name: str
    description: str
    # (model, cache_tokens, config) -> the cache kvlab.generate uses for one batch of requests;
    # None lets kvlab.generate use its own static buffer (native twin where the architecture has one)
    make_cache: Callable[[PreTrainedModel, int, BenchConfig], Cache | None]
    # (cache, model) -> context manager the optimized run executes in (e.g. observation hooks)
    hooks: Callable[[Cache, PreTrainedModel], contextlib.AbstractContextManager] = _no_hooks
    # checks the technique's own config section before any model loads
    validate: Callable[[BenchConfig], None] = _no_validation
    # (loaded model, token ids, config) -> extra quality measurements for the report, or None
    quality: Callable | None = None


def _static_cache(model: PreTrainedModel, cache_tokens: int, config: BenchConfig) -> Cache | None:
    if config.forward_path == "hf":
        return PreallocatedCache(model.config.num_hidden_layers, cache_tokens)
    return None


TECHNIQUES: dict[str, Technique] = {
    "static-cache": Technique(
        "static-cache",
        "kvlab.generate: explicit prefill/decode loop over a K/V buffer preallocated for the request "
        "(engine-native twin of the model; forward_path: hf runs the HF modules instead)",
        _static_cache,
    ),
}


def known_techniques() -> list[str]:
    return sorted([*TECHNIQUES, "paged"])  # paged: the serving engine's own benchmark (kvlab.bench.serving)


# Every registered press is a technique too (imported here, after Technique exists, to avoid a cycle).
from kvlab.bench.generate.press_technique import press_techniques  # noqa: E402

TECHNIQUES.update(press_techniques())
