"""ServerConfig: what `kvlab serve` runs, layered defaults < serve.yaml < `--set KEY=VALUE` < flags.

The YAML format (configs/serve/serve.yaml is the example; a Kubernetes ConfigMap holds one, so keep
it stable):

    model: smollm2-135m          # any name `kvlab models` lists, hub id[@revision], local dir, .gguf
    host: 127.0.0.1              # 0.0.0.0 only when a network should reach it
    port: 8000
    max_queue: 256               # engine requests waiting + running; beyond: 429 with Retry-After
    drain_timeout_s: 30          # on SIGTERM, how long in-flight requests may take to finish
    api_key_env: KVLAB_API_KEY   # env var holding the key; null: no key required
    max_body_bytes: 1048576      # larger request bodies: 413
    threads: null                # torch CPU threads (null: torch's default, every core)
    engine: {num_blocks: 512, max_num_seqs: 64, dtype: float32, quantization: null, ...}  # EngineConfig
    press: {name: snapkv, compression_ratio: 0.5, window: 8}  # optional; every request runs it

An unknown key, a malformed file or a value out of range is a ConfigError naming it, raised before
any model loads.
"""

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from kvlab.engine.compression import RequestPress
from kvlab.engine.config import EngineConfig
from kvlab.errors import ConfigError
from kvlab.models.registry import DEFAULT_MODEL

BUDGET_KEYS = ("max_cache_tokens", "compression_ratio")  # RequestPress's; the other press keys are options


@dataclass(frozen=True, slots=True)
class PressSpec:
    """A press that every request runs with: a registered press (`kvlab presses`), its budget (one of
    max_cache_tokens or compression_ratio) and its options, written flat: {name, budget, **options}."""

    name: str
    max_cache_tokens: int | None = None
    compression_ratio: float | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.build()  # ConfigError for an unknown press or option, a bad budget, or a press the engine cannot run

    @classmethod
    def from_dict(cls, values: Any) -> "PressSpec":
        if not isinstance(values, dict) or not isinstance(values.get("name"), str):
            raise ConfigError(
                f"press must be a mapping with a name (e.g. {{name: snapkv, compression_ratio: 0.5}}), got {values!r}"
            )
        values = dict(values)
        name = values.pop("name")
        budget = {key: values.pop(key) for key in BUDGET_KEYS if key in values}
        return cls(name, options=values, **budget)

    def to_dict(self) -> dict[str, Any]:
        budget = {key: getattr(self, key) for key in BUDGET_KEYS if getattr(self, key) is not None}
        return {"name": self.name, **budget, **self.options}

    def build(self) -> RequestPress:
        from kvlab.press.registry import get_press

        press = get_press(self.name, **self.options)
        return RequestPress(
            press, max_cache_tokens=self.max_cache_tokens, compression_ratio=self.compression_ratio
        )


@dataclass(frozen=True, slots=True)
class ServerConfig:
    model: str = DEFAULT_MODEL
    host: str = "127.0.0.1"  # loopback unless told: a server is not exposed by accident
    port: int = 8000
    max_queue: int = 256
    drain_timeout_s: float = 30.0
    api_key_env: str | None = None
    max_body_bytes: int = 1 << 20
    threads: int | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    press: PressSpec | None = None

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError(f"model must be a non-empty string, got {self.model!r}")
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError(f"host must be a non-empty string, got {self.host!r}")
        _check_int("port", self.port, 1, 65535)
        _check_int("max_queue", self.max_queue, 1)
        _check_int("max_body_bytes", self.max_body_bytes, 1)
        if self.threads is not None:
            _check_int("threads", self.threads, 1)
        timeout = self.drain_timeout_s
        if (
            not isinstance(timeout, int | float)
            or isinstance(timeout, bool)
            or not 0 <= timeout < float("inf")
        ):
            raise ConfigError(f"drain_timeout_s must be a number of seconds >= 0, got {timeout!r}")
        if self.api_key_env is not None and (not isinstance(self.api_key_env, str) or not self.api_key_env):
            raise ConfigError(f"api_key_env must name an environment variable, got {self.api_key_env!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ServerConfig":
        valid = [f.name for f in fields(cls)]
        unknown = [key for key in values if key not in valid]
        if unknown:
            raise ConfigError(f"unknown serve config key {unknown[0]!r}; valid keys: {', '.join(valid)}")
        values = dict(values)
        engine = values.get("engine") or {}
        if not isinstance(engine, dict):
            raise ConfigError(f"engine must be a mapping of EngineConfig fields, got {engine!r}")
        values["engine"] = EngineConfig.from_dict(engine)
        if values.get("press") is not None:
            values["press"] = PressSpec.from_dict(values["press"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config in the YAML format (what the server logs at startup)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("engine", "press")}
        return values | {
            "engine": asdict(self.engine),
            "press": self.press.to_dict() if self.press else None,
        }

    def api_key(self) -> str | None:
        """The key clients must send, read from `api_key_env`; None when no key is required. A named
        variable that is unset or empty is an error: the operator asked for a key."""
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env, "")
        if not key:
            raise ConfigError(
                f"api_key_env names {self.api_key_env}, which is not set (or empty) in the environment"
            )
        return key


def resolve_config(path: str | Path | None, overrides: list[str], flags: dict[str, Any]) -> ServerConfig:
    """defaults < the YAML file at `path` < `--set` pairs ("engine.num_blocks=256") < flags (None: not
    given). The flags dtype/device/quantization are engine keys; `press` names the press ("none": no press)."""
    from kvlab.bench.core.config import merge, parse_overrides, read_yaml

    data = read_yaml(Path(path)) if path else {}
    data = merge(data, parse_overrides(overrides))
    flags = {key: value for key, value in flags.items() if value is not None}
    engine = {key: flags.pop(key) for key in ("dtype", "device", "quantization") if key in flags}
    if engine:
        data = merge(data, {"engine": engine})
    press = flags.pop("press", None)
    if press == "none":
        data["press"] = None
    elif press is not None:
        data = merge(data, {"press": {"name": press}})
    return ServerConfig.from_dict(merge(data, flags))


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < low
        or (high is not None and value > high)
    ):
        limit = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"{name} must be an integer {limit}, got {value!r}")
