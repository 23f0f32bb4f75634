"""Experiment configuration, layered: defaults < technique presets (code) < YAML < `--set` < flags.

Every key is validated before any model loads; an unknown key, a malformed file or a value out of
range raises `ConfigError` naming the key and what is allowed. The resolved config is saved next to
the results, so an experiment describes itself, and the shipped YAML presets hold only what differs
from the code's defaults (see tests/bench/test_config.py).
"""

import dataclasses
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from kvlab.errors import ConfigError, PromptTooLongError
from kvlab.models.loader import DTYPES
from kvlab.models.registry import DEFAULT_MODEL

BATCH_LEVELS = ("small", "medium", "large")
EXPERIMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
METHODS = ("baseline", "optimized", "both")
CONFIG_ROOT = Path(__file__).resolve().parents[3] / "configs"


@dataclass(slots=True)
class ExperimentConfig:
    """What every bench experiment names: the generation bench (`BenchConfig`) and the paged serving
    bench (`ServingConfig`) share these keys and their checks."""

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
        check_batch_level(self.batch_level)
        if not self.dtypes:
            raise ConfigError("dtypes must name at least one dtype")
        for dtype in [*extra_dtypes, *self.dtypes]:
            if dtype not in DTYPES:
                raise ConfigError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ConfigError(f"device must be cpu, cuda or auto, got {self.device!r}")
        if self.threads is not None:
            positive("threads", self.threads)
        # The name is a directory under results/<technique>/ that --overwrite replaces: "." or ".."
        # would name the technique's folder or the results root itself.
        if not isinstance(self.experiment_name, str) or not EXPERIMENT_NAME.fullmatch(self.experiment_name):
            raise ConfigError(
                "experiment name must be letters, digits, '.', '_' or '-', starting with a letter or "
                f"digit, got {self.experiment_name!r}"
            )
        for name in ("technique", "model", "dataset", "method"):
            text(name, getattr(self, name))
        for name in ("split", "data_dir"):
            if getattr(self, name) is not None:
                text(name, getattr(self, name))
        non_negative("seed", self.seed)
        flag("benchmark_memory", self.benchmark_memory)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_context(model: str, tokens: int, what: str) -> None:
    """`tokens` must fit the context of `model` where the registry knows it without loading the model
    (a hub id or a local model is checked once loaded)."""
    from kvlab.models.registry import MODELS

    spec = MODELS.get(model)
    context = spec.known_context_length if spec is not None else None
    if context is not None and tokens > context:
        raise PromptTooLongError(f"{what} ({tokens} tokens) exceeds {model}'s context of {context} tokens")


def check_batch_level(level: str) -> None:
    if level not in BATCH_LEVELS:
        raise ConfigError(f"batch level must be one of {', '.join(BATCH_LEVELS)}, got {level!r}")


def positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def text(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name} must be a non-empty string, got {value!r}")


def flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")


def non_negative(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:  # a directory, no permission, not UTF-8 text
        raise ConfigError(f"cannot read config file {path}: {error}") from None
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
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(
                    f"--set {key}: {'.'.join(parents[: depth + 1])} was set to a value, not a mapping"
                )
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


def check_keys(prefix: str, data: dict[str, Any], cls: type) -> None:
    valid = [f.name for f in fields(cls)]
    for key in data:
        if key not in valid:
            raise ConfigError(
                f"unknown config key '{prefix}{key}'; valid keys: {', '.join(prefix + v for v in valid)}"
            )


def take_section(data: dict[str, Any], name: str, cls: type):
    """Pops the nested mapping `name` from a config dict (absent: {}), checks its keys against `cls`'s
    fields and builds it."""
    values = data.pop(name, None) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{name} must be a mapping, got {values!r}")
    check_keys(f"{name}.", values, cls)
    return cls(**values)


def as_lists(data: dict[str, Any], keys: tuple[str, ...]) -> None:
    """A scalar given where a list is expected (`--set dtypes=float32`) becomes a one-element list."""
    for key in keys:
        if key in data and not isinstance(data[key], list):
            data[key] = [data[key]]


def preset_path(technique: str, batch_level: str) -> Path:
    return CONFIG_ROOT / technique / f"{batch_level}.yaml"


def layer(
    technique: str,
    batch_level: str,
    config_file: str | Path | None,
    overrides: list[str],
    flags: dict[str, Any],
    presets: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The merged (not yet validated) config data: technique/batch level < `presets` (the technique's
    defaults in code) < YAML (`config_file`, else the shipped preset) < --set < flags (None: not given)."""
    check_batch_level(batch_level)
    path = Path(config_file) if config_file else preset_path(technique, batch_level)
    data = merge({"technique": technique, "batch_level": batch_level}, presets or {})
    data = merge(data, read_yaml(path))
    data = merge(data, parse_overrides(overrides))
    return merge(data, {key: value for key, value in flags.items() if value is not None})
