"""Configuration of the paged bench: its three workloads and the engine's fields, layered
defaults < configs/paged/<level>.yaml < --set < flags and validated before any model loads."""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvlab.bench.core.config import (
    ExperimentConfig,
    as_lists,
    check_context,
    check_keys,
    flag,
    layer,
    non_negative,
    positive,
    take_section,
)
from kvlab.engine.config import EngineConfig
from kvlab.errors import ConfigError

TECHNIQUE = "paged"


@dataclass(slots=True)
class MixedWorkload:
    num_requests: int = 24
    prompt_len_min: int = 32
    prompt_len_max: int = 256
    output_len_min: int = 16
    output_len_max: int = 128
    hf_batch_size: int = 8  # requests per `model.generate` call of the static-batching baseline
    repeats: int = 1  # rounds alternating engine and HF, so a busy spell on the machine hits both


@dataclass(slots=True)
class PrefixWorkload:
    num_requests: int = 6
    prefix_len: int = 512  # the shared system prompt
    suffix_len: int = 32  # each request's own question
    output_len: int = 4


@dataclass(slots=True)
class DecodeWorkload:
    """Batch-1 decode of one prompt per length, on every path and dtype, round by round."""

    prompt_lens: list[int] = field(default_factory=lambda: [128, 512])
    new_tokens: int = 32
    warmup: int = 1
    repeats: int = 3


@dataclass(slots=True)
class CompressionWorkload:
    """The same long requests served by the engine with and without a press (StreamingLLM as a ring
    inside the paged cache): blocks in use, throughput and agreement with the HF-path press."""

    press: str = "streaming_llm"
    max_cache_tokens: int = 128
    num_requests: int = 8
    prompt_len: int = 256
    output_len: int = 64
    enabled: bool = True


SECTIONS = {
    "mixed": MixedWorkload,
    "prefix": PrefixWorkload,
    "decode": DecodeWorkload,
    "compression": CompressionWorkload,
}


@dataclass(slots=True)
class ServingConfig(ExperimentConfig):
    technique: str = TECHNIQUE
    dtype: str = "float32"  # of the mixed and prefix workloads; `dtypes`: of the decode comparison
    engine: dict[str, Any] = field(default_factory=dict)  # EngineConfig fields except dtype and device
    mixed: MixedWorkload = field(default_factory=MixedWorkload)
    prefix: PrefixWorkload = field(default_factory=PrefixWorkload)
    decode: DecodeWorkload = field(default_factory=DecodeWorkload)
    compression: CompressionWorkload = field(default_factory=CompressionWorkload)

    def validate(self) -> None:
        if self.technique != TECHNIQUE:
            raise ConfigError(f"this config is for technique {self.technique!r}, not {TECHNIQUE!r}")
        self.validate_common(self.dtype)
        if self.method != "both":
            raise ConfigError(
                f"the paged bench measures the engine against HF: method must be 'both', got {self.method!r}"
            )
        for section in SECTIONS:
            for item in dataclasses.fields(getattr(self, section)):
                value = getattr(getattr(self, section), item.name)
                if item.name in ("press", "enabled"):
                    continue  # checked below
                if item.name == "prompt_lens":
                    if not isinstance(value, list) or not value:
                        raise ConfigError(f"decode.prompt_lens must be a list of lengths, got {value!r}")
                    for length in value:
                        positive("decode.prompt_lens", length)
                elif item.name == "warmup":
                    non_negative(f"{section}.warmup", value)
                else:
                    positive(f"{section}.{item.name}", value)
        mixed = self.mixed
        if mixed.prompt_len_min > mixed.prompt_len_max or mixed.output_len_min > mixed.output_len_max:
            raise ConfigError("mixed: each *_min must be <= its *_max")
        if mixed.output_len_min < 2 or self.decode.new_tokens < 2:
            raise ConfigError("output lengths must be >= 2 (TPOT needs a token after the first)")
        if self.prefix.num_requests < 2:
            raise ConfigError("prefix.num_requests must be >= 2 (the first request only fills the cache)")
        for section in SECTIONS:
            if hasattr(getattr(self, section), "enabled"):
                flag(f"{section}.enabled", getattr(self, section).enabled)
        if self.compression.enabled:
            from kvlab.engine.compression import RequestPress
            from kvlab.press import get_press

            # An unknown press, or one the engine cannot run, fails here, before any model loads.
            press = RequestPress(
                get_press(self.compression.press), max_cache_tokens=self.compression.max_cache_tokens
            )
            press.budget(self.compression.prompt_len, num_layers=1)
        self.engine_config(self.dtype)  # unknown or bad engine keys fail here, before any model loads
        check_context(self.model, self.longest_request(), "the longest request (prompt + output)")

    def longest_request(self) -> int:
        """Tokens of context the longest request of any workload needs (the engine caps an output at
        the context, so a longer one would be cut short and its throughput miscounted)."""
        lengths = [
            self.mixed.prompt_len_max + self.mixed.output_len_max,
            max(self.decode.prompt_lens) + self.decode.new_tokens,
            self.prefix.prefix_len + self.prefix.suffix_len + self.prefix.output_len,
        ]
        if self.compression.enabled:
            lengths.append(self.compression.prompt_len + self.compression.output_len)
        return max(lengths)

    def engine_config(self, dtype: str, **changes: Any) -> EngineConfig:
        for key in ("dtype", "device"):
            if key in self.engine:
                raise ConfigError(
                    f"engine.{key} is set at the top level of the paged bench config ({key}: ...)"
                )
        return EngineConfig.from_dict({**self.engine, "dtype": dtype, "device": self.device, **changes})


def from_dict(data: dict[str, Any]) -> ServingConfig:
    """Build a ServingConfig, rejecting unknown keys at any level."""
    data = dict(data)
    sections = {name: take_section(data, name, cls) for name, cls in SECTIONS.items()}
    if not isinstance(sections["decode"].prompt_lens, list):  # `--set decode.prompt_lens=512`
        sections["decode"].prompt_lens = [sections["decode"].prompt_lens]
    check_keys("", data, ServingConfig)
    as_lists(data, ("dtypes",))
    if not isinstance(data.get("engine", {}), dict):
        raise ConfigError(f"engine must be a mapping of EngineConfig fields, got {data['engine']!r}")
    return ServingConfig(**data, **sections)


def resolve(
    batch_level: str, config_file: str | Path | None, overrides: list[str], flags: dict[str, Any]
) -> ServingConfig:
    """Layer defaults < configs/paged/<level>.yaml (or `config_file`) < --set < flags, then validate."""
    config = from_dict(layer(TECHNIQUE, batch_level, config_file, overrides, flags))
    config.validate()
    return config
