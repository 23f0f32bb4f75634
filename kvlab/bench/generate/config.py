"""The generation bench's config (`kvlab bench --technique static-cache | <press>`): what a run measures,
layered by `kvlab.bench.core.config` and validated before any model loads."""

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvlab.bench.core.config import (
    METHODS,
    ExperimentConfig,
    as_lists,
    check_batch_level,
    check_context,
    check_keys,
    flag,
    layer,
    non_negative,
    positive,
    take_section,
)
from kvlab.errors import ConfigError


@dataclass(slots=True)
class PplConfig:
    """Sliding-window perplexity (HF guide protocol) of the model, measured once per experiment."""

    enabled: bool = True
    max_length: int = 1024
    stride: int = 512
    max_tokens: int = 4096

    def validate(self) -> None:
        flag("ppl.enabled", self.enabled)
        positive("ppl.max_length", self.max_length)
        positive("ppl.stride", self.stride)
        positive("ppl.max_tokens", self.max_tokens)
        if self.stride > self.max_length:
            raise ConfigError(f"ppl.stride ({self.stride}) must be <= ppl.max_length ({self.max_length})")


@dataclass(slots=True)
class BenchConfig(ExperimentConfig):
    batch_size: int = 1
    prompt_lengths: list[int] = field(default_factory=lambda: [128, 512])
    new_tokens: int = 32
    warmup: int = 1
    repeats: int = 3
    forward_path: str = "auto"  # "auto" (engine-native twin where supported) or "hf"
    press: dict[str, Any] | None = None
    ppl: PplConfig = field(default_factory=PplConfig)

    def validate(self, known_techniques: list[str]) -> None:
        if self.technique not in known_techniques:
            raise ConfigError(
                f"unknown technique {self.technique!r}; choose one of {', '.join(known_techniques)}"
            )
        self.validate_common()
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.forward_path not in ("auto", "hf"):
            raise ConfigError(f"forward_path must be auto or hf, got {self.forward_path!r}")
        if not self.prompt_lengths:
            raise ConfigError("prompt_lengths must list at least one length")
        for length in self.prompt_lengths:
            positive("prompt_lengths", length)
        positive("batch_size", self.batch_size)
        positive("new_tokens", self.new_tokens)
        positive("repeats", self.repeats)
        if self.new_tokens < 2:
            raise ConfigError("new_tokens must be >= 2 (TPOT needs a token after the first)")
        non_negative("warmup", self.warmup)
        self.ppl.validate()
        check_context(
            self.model, max(self.prompt_lengths) + self.new_tokens, "the longest prompt + new_tokens"
        )
        from kvlab.bench.generate.registry import TECHNIQUES

        if self.technique in TECHNIQUES:
            TECHNIQUES[self.technique].validate(self)


def from_dict(data: dict[str, Any]) -> BenchConfig:
    """Build a BenchConfig, rejecting unknown keys at any level."""
    data = dict(data)
    ppl = take_section(data, "ppl", PplConfig)
    check_keys("", data, BenchConfig)
    as_lists(data, ("dtypes", "prompt_lengths"))
    return BenchConfig(**data, ppl=ppl)


def resolve(
    technique: str,
    batch_level: str,
    config_file: str | Path | None,
    overrides: list[str],
    flags: dict[str, Any],
    known_techniques: list[str],
) -> BenchConfig:
    """Layer defaults < the technique's presets < YAML < --set < flags, then validate everything
    before any model is loaded."""
    from kvlab.bench.generate.registry import TECHNIQUES

    if technique not in known_techniques:
        raise ConfigError(f"unknown technique {technique!r}; choose one of {', '.join(known_techniques)}")
    check_batch_level(batch_level)
    known = TECHNIQUES.get(technique)
    presets = copy.deepcopy(known.presets(batch_level)) if known is not None else {}
    config = from_dict(layer(technique, batch_level, config_file, overrides, flags, presets))
    config.validate(known_techniques)
    return config
