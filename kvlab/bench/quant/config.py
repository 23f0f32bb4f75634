"""Configuration of the quantization bench: which methods run (see methods.py), the prompts, the PPL
protocol and the calibration. Layered defaults < configs/quantization/<level>.yaml < --set < flags,
validated before any model loads."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvlab.bench.core.config import (
    ExperimentConfig,
    as_lists,
    check_keys,
    layer,
    non_negative,
    positive,
    take_section,
)
from kvlab.bench.generate.config import PplConfig
from kvlab.errors import ConfigError

TECHNIQUE = "quantization"
ALIASES = ("量化",)  # the specification's name for the technique

DEFAULT_METHODS = [
    "float32",
    "bfloat16",
    "int8",
    "int4-g128",
    "gptq-int4-g128",
    "awq-int4-g128",
    "gguf",
    "kv-int8",
    "kv-int4",
]


@dataclass(slots=True)
class CalibrationConfig:
    """GPTQ / AWQ calibration: seeded windows of wikitext-2 *validation* text (never the test split)."""

    num_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    act_order: bool = True  # GPTQ: columns by decreasing Hessian diagonal (the paper's act-order)


@dataclass(slots=True)
class QuantBenchConfig(ExperimentConfig):
    technique: str = TECHNIQUE
    dtypes: list[str] = field(default_factory=lambda: ["float32"])  # the baseline's dtype
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    batch_size: int = 1
    prompt_lengths: list[int] = field(default_factory=lambda: [128])
    new_tokens: int = 32
    warmup: int = 1
    repeats: int = 3
    include_embeddings: bool = True  # quantize the embedding and the (tied) LM head too
    kernel_repeats: int = 5  # passes over all weights per kernel in the GEMM comparison
    ppl: PplConfig = field(default_factory=PplConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def validate(self) -> None:
        from kvlab.quant.methods import parse_method

        if self.technique != TECHNIQUE:
            raise ConfigError(f"this config is for technique {self.technique!r}, not {TECHNIQUE!r}")
        self.validate_common()
        if self.dtypes != ["float32"]:
            raise ConfigError(
                "the quantization bench's baseline is float32 (dtypes: [float32]); bfloat16 is a method"
            )
        if not self.methods:
            raise ConfigError("methods must name at least one method")
        for method in self.methods:
            parse_method(method)
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"methods repeat: {self.methods}")
        if not self.prompt_lengths or not all(isinstance(n, int) and n > 0 for n in self.prompt_lengths):
            raise ConfigError(f"prompt_lengths must be positive ints, got {self.prompt_lengths!r}")
        for name in ("batch_size", "new_tokens", "repeats", "kernel_repeats"):
            positive(name, getattr(self, name))
        non_negative("warmup", self.warmup)
        if self.new_tokens < 2:
            raise ConfigError("new_tokens must be >= 2 (TPOT needs two tokens)")
        positive("ppl.max_length", self.ppl.max_length)
        positive("ppl.stride", self.ppl.stride)
        positive("ppl.max_tokens", self.ppl.max_tokens)
        positive("calibration.num_samples", self.calibration.num_samples)
        positive("calibration.seq_len", self.calibration.seq_len)


def from_dict(data: dict[str, Any]) -> QuantBenchConfig:
    data = dict(data)
    sections = {
        key: take_section(data, key, cls)
        for key, cls in (("ppl", PplConfig), ("calibration", CalibrationConfig))
    }
    check_keys("", data, QuantBenchConfig)
    as_lists(data, ("methods", "prompt_lengths", "dtypes"))
    if data.get("technique") in ALIASES:
        data["technique"] = TECHNIQUE
    return QuantBenchConfig(**data, **sections)


def resolve(
    batch_level: str, config_file: str | Path | None, overrides: list[str], flags: dict[str, Any]
) -> QuantBenchConfig:
    """Layer defaults < configs/quantization/<level>.yaml (or `config_file`) < --set < flags, then validate."""
    config = from_dict(layer(TECHNIQUE, batch_level, config_file, overrides, flags))
    config.validate()
    return config
