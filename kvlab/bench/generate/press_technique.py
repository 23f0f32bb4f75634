"""Every registered press as a bench technique: `kvlab bench --technique snapkv ...`.

The optimized path is `kvlab.generate(press=..., budget=...)`: on the engine-native twin and its
kernels where the press runs there (prefill-time presses compressed per layer inside the prefill,
StreamingLLM as a ring; kvlab/native_press.py), through a `PressCache` on the HF modules otherwise
(h2o, tova, per-head budgets; or `forward_path: hf`); the run's `forward_path` says which. Config
section:

    press:
      compression_ratio: 0.5     # fraction of the prompt's K/V removed; or max_cache_tokens: 256
      rerotate: false            # key re-rotation wrapper (positions inside the cache)
      per_head: false            # AdaKV-style per-head budgets wrapper
      options: {}                # the press's own options (e.g. window, kernel, n_sink)

Quality is measured under the protocol that fits the press, against the full cache on the same tokens:
presses that evict during decode (StreamingLLM, H2O, TOVA) by streaming PPL (token by token, the
press evicting every step, budget = max_cache_tokens); prefill-time presses by compressed-context
PPL (each window of `ppl.max_length` tokens: prefill the first half, compress, score the second).
"""

import math
from typing import Any

import torch
from transformers import PreTrainedModel

from kvlab.bench.generate.config import BenchConfig
from kvlab.bench.generate.technique import Technique
from kvlab.errors import ConfigError
from kvlab.models.loader import LoadedModel
from kvlab.press.base import Press
from kvlab.press.budget import Budget
from kvlab.press.registry import PRESSES, get_press

PRESS_KEYS = ("compression_ratio", "max_cache_tokens", "rerotate", "per_head", "options")
DEFAULT_SECTION = {"compression_ratio": 0.5}

# Every press's batch-level defaults, in one place: configs/<press>/<level>.yaml add only what
# differs. Decode-time presses (StreamingLLM, H2O, TOVA) run the long-context experiment at the large
# level: a fixed budget of 512 tokens per layer up to SmolLM2's 8k context; their quality at long
# range is `kvlab ppl --mode streaming`.
PRESETS: dict[str, dict[str, Any]] = {
    "small": {
        "dtypes": ["float32"],
        "prompt_lengths": [256, 512],
        "repeats": 2,
        "press": DEFAULT_SECTION,
        "ppl": {"max_length": 512, "stride": 256, "max_tokens": 1024},
    },
    "medium": {
        "batch_size": 4,
        "prompt_lengths": [512, 1024],
        "new_tokens": 64,
        "repeats": 2,
        "press": DEFAULT_SECTION,
        "ppl": {"max_tokens": 2048},
    },
    "large": {
        "dataset": "pg19",
        "dtypes": ["float32"],
        "batch_size": 8,
        "prompt_lengths": [1024, 2048],
        "new_tokens": 64,
        "warmup": 0,
        "repeats": 1,
        "press": DEFAULT_SECTION,
        "ppl": {"max_length": 2048, "stride": 1024, "max_tokens": 8192},
    },
}
DECODE_TIME_LARGE: dict[str, Any] = {
    "dataset": "pg19",
    "dtypes": ["float32"],
    "prompt_lengths": [1024, 2048, 4096, 8000],
    "new_tokens": 64,
    "warmup": 0,
    "repeats": 1,
    "press": {"max_cache_tokens": 512},
    "ppl": {"enabled": False},
}


def presets_for(name: str):
    """The batch-level defaults of press `name` (a function of the level, for `Technique.presets`)."""

    def presets(batch_level: str) -> dict[str, Any]:
        if batch_level == "large" and PRESSES[name].evicts_during_decode:
            return DECODE_TIME_LARGE
        return PRESETS[batch_level]

    return presets


def _section(config: BenchConfig) -> dict[str, Any]:
    return config.press or DEFAULT_SECTION


def _budget(section: dict[str, Any]) -> Budget:
    """The press budget of the config section (ConfigError for a missing, doubled or bad one)."""
    return Budget(section.get("max_cache_tokens"), section.get("compression_ratio"))


def build_press(config: BenchConfig):
    section = _section(config)
    return get_press(
        config.technique,
        rerotate=bool(section.get("rerotate", False)),
        per_head=bool(section.get("per_head", False)),
        **(section.get("options") or {}),
    )


def validate(config: BenchConfig) -> None:
    section = _section(config)
    if not isinstance(section, dict):
        raise ConfigError(f"press must be a mapping with keys {', '.join(PRESS_KEYS)}")
    unknown = sorted(set(section) - set(PRESS_KEYS))
    if unknown:
        raise ConfigError(
            f"unknown config key 'press.{unknown[0]}'; valid keys: {', '.join('press.' + k for k in PRESS_KEYS)}"
        )
    budget, press = _budget(section), build_press(config)
    # A budget the press cannot run at some prompt length fails here, before any cell of a sweep runs
    # (the average layer's budget; PyramidKV's per-layer split keeps each layer at least the minimum).
    for prompt_len in config.prompt_lengths:
        budget.layers(press, 1, prompt_len)


def press_and_budget(config: BenchConfig) -> tuple[Press, Budget]:
    """What the optimized path runs: `kvlab.generate(press=..., budget=...)`, which builds the cache --
    the engine-native twin's per-layer buffers where the press runs there, else a `PressCache`."""
    return build_press(config), _budget(_section(config))


def no_cache(model: PreTrainedModel, cache_tokens: int, config: BenchConfig) -> None:
    return None  # kvlab.generate builds the press cache itself (`Technique.press`)


def quality(loaded: LoadedModel, token_ids: torch.Tensor, config: BenchConfig) -> dict[str, Any]:
    """Full cache vs the press on the same tokens, under the protocol the press calls for."""
    from kvlab.bench.eval.streaming_ppl import compressed_context_ppl, streaming_ppl

    press = build_press(config)
    section = _section(config)
    model, length = loaded.model, config.ppl.max_length
    if press.evicts_during_decode:
        # A ratio is taken of one PPL window, as PressCache would of a first forward of that length.
        budget = _budget(section).tokens(length)
        ids = token_ids[: min(config.ppl.max_tokens, loaded.context_length)]
        full = streaming_ppl(model, ids, "full")
        pressed = streaming_ppl(model, ids, config.technique, max_cache_tokens=budget, press=press)
        protocol = (
            f"streaming PPL: {ids.numel()} tokens fed one at a time at their true positions, the press evicting "
            f"every step to a budget of {budget} tokens per layer; full = uncompressed cache"
        )
        return {
            "protocol": protocol,
            "full_ppl": full.ppl,
            "press_ppl": pressed.ppl,
            "press_kv_bytes": pressed.kv_bytes,
            "full_kv_bytes": full.kv_bytes,
        }
    windows = [
        token_ids[i : i + length]
        for i in range(0, min(config.ppl.max_tokens, token_ids.numel()) - length + 1, length)
    ]
    if not windows:
        raise ConfigError(
            f"ppl.max_tokens ({config.ppl.max_tokens}) must cover one window of ppl.max_length ({length})"
        )
    budget = {
        "max_cache_tokens": section.get("max_cache_tokens"),
        "compression_ratio": section.get("compression_ratio"),
    }
    full_nll, press_nll, press_bytes, full_bytes = [], [], 0, 0
    for window in windows:
        full = compressed_context_ppl(model, window, None, context_len=length // 2)
        pressed = compressed_context_ppl(model, window, press, context_len=length // 2, **budget)
        full_nll.append(full.nll)
        press_nll.append(pressed.nll)
        press_bytes, full_bytes = pressed.kv_bytes, full.kv_bytes
    protocol = (
        f"compressed-context PPL: {len(windows)} windows of {length} tokens; prefill the first {length // 2}, "
        f"compress ({budget}), score the other {length - length // 2} in one forward over the compressed cache"
    )
    return {
        "protocol": protocol,
        "full_ppl": math.exp(float(torch.cat(full_nll).mean())),
        "press_ppl": math.exp(float(torch.cat(press_nll).mean())),
        "press_kv_bytes": press_bytes,
        "full_kv_bytes": full_bytes,
    }


def press_techniques() -> dict[str, Technique]:
    return {
        name: Technique(
            name,
            f"kvlab.generate(press={name}): {(cls.__doc__ or name).strip().splitlines()[0]}",
            no_cache,
            validate=validate,
            quality=quality,
            presets=presets_for(name),
            press=press_and_budget,
        )
        for name, cls in PRESSES.items()
    }
