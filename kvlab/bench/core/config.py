"""Experiment configuration: defaults < YAML file < `--set key=value` < explicit CLI flags.

Every key is validated before any model loads; an unknown key, a malformed file or a value out of
range raises `ConfigError` naming the key and what is allowed. The resolved config is saved next to
the results so an experiment describes itself.
"""

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from kvlab.errors import ConfigError
from kvlab.models.loader import DTYPES
from kvlab.models.registry import DEFAULT_MODEL

BATCH_LEVELS = ("small", "medium", "large")
METHODS = ("baseline", "optimized", "both")
CONFIG_ROOT = Path(__file__).resolve().parents[3] / "configs"


@dataclass(slots=True)
class PplConfig:
    """Sliding-window perplexity (HF guide protocol) of the model, measured once per experiment."""

    enabled: bool = True
    max_length: int = 1024
    stride: int = 512
    max_tokens: int = 4096

    def validate(self) -> None:
        _positive("ppl.max_length", self.max_length)
        _positive("ppl.stride", self.stride)
        _positive("ppl.max_tokens", self.max_tokens)
        if self.stride > self.max_length:
            raise ConfigError(f"ppl.stride ({self.stride}) must be <= ppl.max_length ({self.max_length})")


@dataclass(slots=True)
class ExperimentConfig:
    """What every bench experiment names: the static/press techniques (`BenchConfig`) and the paged
    serving bench (`ServingConfig`) share these keys and their checks."""

    technique: str = "static-cache"
    batch_level: str = "small"
    experiment_name: str = "default"
    model: str = DEFAULT_MODEL
    dataset: str = "wikitext2"
    split: str | None = None
    data_dir: str | None = None
    device: str = "cpu"
    dtypes: list[str] = field(default_factory=lambda: ["float32", "bfloat16"])
    threads: int | None = None
    seed: int = 0
    method: str = "both"
    benchmark_memory: bool = True

    def validate_common(self, *extra_dtypes: str) -> None:
        if self.batch_level not in BATCH_LEVELS:
            raise ConfigError(
                f"batch level must be one of {', '.join(BATCH_LEVELS)}, got {self.batch_level!r}"
            )
        if not self.dtypes:
            raise ConfigError("dtypes must name at least one dtype")
        for dtype in [*extra_dtypes, *self.dtypes]:
            if dtype not in DTYPES:
                raise ConfigError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ConfigError(f"device must be cpu, cuda or auto, got {self.device!r}")
        if self.threads is not None:
            _positive("threads", self.threads)
        if not self.experiment_name or "/" in self.experiment_name:
            raise ConfigError(
                f"experiment name must be a non-empty name without '/', got {self.experiment_name!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(slots=True)
class BenchConfig(ExperimentConfig):
    batch_size: int = 1
    prompt_lengths: list[int] = field(default_factory=lambda: [128, 512])
    new_tokens: int = 32
    warmup: int = 1
    repeats: int = 3
    forward_path: str = "auto"  # static-cache: "auto" (engine-native twin where supported) or "hf"
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
            _positive("prompt_lengths", length)
        _positive("batch_size", self.batch_size)
        _positive("new_tokens", self.new_tokens)
        _positive("repeats", self.repeats)
        if self.new_tokens < 2:
            raise ConfigError("new_tokens must be >= 2 (TPOT needs a token after the first)")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"warmup must be an integer >= 0, got {self.warmup!r}")
        self.ppl.validate()
        from kvlab.bench.generate.techniques import TECHNIQUES

        if self.technique in TECHNIQUES:
            TECHNIQUES[self.technique].validate(self)


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"malformed YAML in {path}{where}: {getattr(error, 'problem', error)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["ppl.max_tokens=2048", "dtypes=[float32]"]` -> nested dict; values parsed as YAML scalars/lists."""
    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: cannot parse value {raw!r}") from None
        node = result
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return result


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def from_dict(data: dict[str, Any]) -> BenchConfig:
    """Build a BenchConfig, rejecting unknown keys at any level."""
    data = dict(data)
    ppl = data.pop("ppl", None) or {}
    if not isinstance(ppl, dict):
        raise ConfigError(f"ppl must be a mapping, got {ppl!r}")
    _check_keys("", data, BenchConfig)
    _check_keys("ppl.", ppl, PplConfig)
    for key in ("dtypes", "prompt_lengths"):
        if key in data and not isinstance(data[key], list):
            data[key] = [data[key]]
    return BenchConfig(**data, ppl=PplConfig(**ppl))


def _check_keys(prefix: str, data: dict[str, Any], cls: type) -> None:
    valid = [f.name for f in fields(cls)]
    for key in data:
        if key not in valid:
            raise ConfigError(
                f"unknown config key '{prefix}{key}'; valid keys: {', '.join(prefix + v for v in valid)}"
            )


def flags_from_args(args) -> dict[str, Any]:
    """The `kvlab bench` flags that set config keys (None: not given, so lower layers win)."""
    return {
        "experiment_name": args.experiment_name,
        "method": args.method,
        "benchmark_memory": args.benchmark_memory,
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "dtypes": args.dtypes,
        "model": args.model,
        "device": args.device,
        "threads": args.threads,
    }


def resolve(
    technique: str,
    batch_level: str,
    config_file: str | None,
    overrides: list[str],
    flags: dict[str, Any],
    known_techniques: list[str],
) -> BenchConfig:
    """Layer defaults < YAML < --set < flags, then validate everything before any model is loaded."""
    if technique not in known_techniques:
        raise ConfigError(f"unknown technique {technique!r}; choose one of {', '.join(known_techniques)}")
    if batch_level not in BATCH_LEVELS:
        raise ConfigError(f"batch level must be one of {', '.join(BATCH_LEVELS)}, got {batch_level!r}")
    path = Path(config_file) if config_file else CONFIG_ROOT / technique / f"{batch_level}.yaml"
    data = merge({"technique": technique, "batch_level": batch_level}, read_yaml(path))
    data = merge(data, parse_overrides(overrides))
    data = merge(data, {key: value for key, value in flags.items() if value is not None})
    config = from_dict(data)
    config.validate(known_techniques)
    return config
