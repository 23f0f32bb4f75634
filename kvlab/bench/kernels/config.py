"""Configuration of the kernel micro-benchmark (`kvlab bench --technique kernels`): which rows counts
the skinny GEMM is timed at over the model's weights, and the paged decode-attention shape. Layered
defaults < configs/kernels/<level>.yaml < --set < flags, validated before any model loads."""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvlab.bench.core.config import ExperimentConfig, as_lists, check_keys, layer, positive, take_section
from kvlab.bench.kernels.past_kernel import REVISION
from kvlab.errors import ConfigError

TECHNIQUE = "kernels"


@dataclass(slots=True)
class AttentionShape:
    """Paged decode attention of `num_requests` requests of `context_len` cached tokens each."""

    num_requests: int = 16
    context_len: int = 1024
    block_size: int = 16
    repeats: int = 20
    # Calls rotate over this many caches, each call reading another than the last few, as the layers of
    # a decode step each read their own (K/V from memory); the same cache every call (K/V in the
    # last-level cache after the first) is timed too.
    caches: int = 8
    # The revision whose paged-attention op is timed beside today's (issue 11's baseline), built from
    # the checkout's git history; "" times none.
    past_revision: str = "38295d3"


@dataclass(slots=True)
class KernelsConfig(ExperimentConfig):
    technique: str = TECHNIQUE
    rows: list[int] = field(default_factory=lambda: [1, 4, 8, 16, 32])
    repeats: int = 11  # timed passes over all the weights per (dtype, rows, kernel); the median is shown
    attention: AttentionShape = field(default_factory=AttentionShape)

    def validate(self) -> None:
        if self.technique != TECHNIQUE:
            raise ConfigError(f"this config is for technique {self.technique!r}, not {TECHNIQUE!r}")
        self.validate_common()
        if self.device != "cpu":
            raise ConfigError(
                f"the kernel bench times kvlab's CPU kernels: device must be cpu, got {self.device!r}"
            )
        if not self.rows or not all(isinstance(r, int) and r > 0 for r in self.rows):
            raise ConfigError(f"rows must be a non-empty list of positive ints, got {self.rows!r}")
        if 1 not in self.rows:
            raise ConfigError("rows must include 1: the other rows counts are measured against one row")
        positive("repeats", self.repeats)
        for item in dataclasses.fields(self.attention):
            if item.type is int:
                positive(f"attention.{item.name}", getattr(self.attention, item.name))
        revision = self.attention.past_revision
        if not isinstance(revision, str) or (revision and not REVISION.fullmatch(revision)):
            raise ConfigError(
                f'attention.past_revision must be a hexadecimal commit id or "" for none, got {revision!r}'
            )


def from_dict(data: dict[str, Any]) -> KernelsConfig:
    data = dict(data)
    attention = take_section(data, "attention", AttentionShape)
    check_keys("", data, KernelsConfig)
    as_lists(data, ("rows", "dtypes"))
    return KernelsConfig(**data, attention=attention)


def resolve(
    batch_level: str, config_file: str | Path | None, overrides: list[str], flags: dict[str, Any]
) -> KernelsConfig:
    """Layer defaults < configs/kernels/<level>.yaml (or `config_file`) < --set < flags, then validate."""
    config = from_dict(layer(TECHNIQUE, batch_level, config_file, overrides, flags))
    config.validate()
    return config
