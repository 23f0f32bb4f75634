"""What a generation-bench technique is: how its optimized path builds its cache, what it observes,
how it checks its config, measures quality and presets its batch levels.

The baseline is always plain `model.generate()` with its default cache. A technique's optimized
path is `kvlab.generate` with the cache the technique builds (static, compressed, ...), so both
paths see identical inputs and differ only in what the technique changes.
"""

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from kvlab.bench.generate.config import BenchConfig
from kvlab.errors import ConfigError


def _no_hooks(cache: Cache, model: PreTrainedModel) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def _no_validation(config: BenchConfig) -> None:
    if config.press is not None:
        raise ConfigError(f"technique {config.technique!r} takes no 'press' section")


def _no_presets(batch_level: str) -> dict[str, Any]:
    return {}


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
    # batch level -> the technique's defaults at that level (config keys); YAML presets add only
    # what differs from these
    presets: Callable[[str], dict[str, Any]] = _no_presets
    # config -> (press, Budget) for kvlab.generate(press=..., budget=...), which then builds the cache
    # itself (native twin where the press runs there); None: the technique's cache is make_cache's
    press: Callable[[BenchConfig], tuple[Any, Any]] | None = None
