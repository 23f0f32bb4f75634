"""Configuration of the serving (HTTP load) bench, layered defaults < configs/serving/<level>.yaml <
--set < flags and validated before a server starts."""

import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvlab.bench.core.config import (
    ExperimentConfig,
    as_lists,
    check_context,
    check_keys,
    layer,
    positive,
    take_section,
)
from kvlab.engine.config import EngineConfig
from kvlab.errors import ConfigError

TECHNIQUE = "serving"
# The loaded run repeats the unloaded run's prompts: with the prefix cache on, it would find them
# cached and measure a replay, not serving. (Set engine.enable_prefix_caching: true to measure that.)
PRESETS = {"engine": {"enable_prefix_caching": False}}


@dataclass(slots=True)
class LoadWorkload:
    """`num_clients` streaming clients share `num_requests` requests (closed loop: a client sends its
    next request when its last one ends; with as many requests as clients, all arrive at t=0). A
    seeded `abort_fraction` of the requests is read for a seeded number of chunks, then disconnected."""

    num_clients: int = 4
    num_requests: int = 8
    prompt_len_min: int = 16
    prompt_len_max: int = 64
    output_len_min: int = 8  # max_tokens of a request, drawn in [min, max]
    output_len_max: int = 24
    abort_fraction: float = 0.25
    ignore_eos: bool = True  # every completed request is max_tokens long (kvlab serve's extension)
    request_timeout_s: float = 600.0

    def validate(self) -> None:
        for name in ("num_clients", "num_requests", "prompt_len_min", "prompt_len_max"):
            positive(f"load.{name}", getattr(self, name))
        positive("load.output_len_min", self.output_len_min)
        positive("load.output_len_max", self.output_len_max)
        if self.prompt_len_min > self.prompt_len_max or self.output_len_min > self.output_len_max:
            raise ConfigError("load: each *_min must be <= its *_max")
        if self.output_len_min < 2:
            raise ConfigError(
                f"load.output_len_min must be >= 2 (an aborted client reads at least one token of a "
                f"request and leaves before the last; TPOT needs two), got {self.output_len_min}"
            )
        if not isinstance(self.abort_fraction, (int, float)) or not 0 <= self.abort_fraction < 1:
            raise ConfigError(f"load.abort_fraction must be in [0, 1), got {self.abort_fraction!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ConfigError(f"load.ignore_eos must be true or false, got {self.ignore_eos!r}")
        if not isinstance(self.request_timeout_s, (int, float)) or not self.request_timeout_s > 0:
            raise ConfigError(f"load.request_timeout_s must be > 0, got {self.request_timeout_s!r}")

    @property
    def num_aborts(self) -> int:
        return math.floor(self.abort_fraction * self.num_requests + 0.5)


@dataclass(slots=True)
class LoadBenchConfig(ExperimentConfig):
    technique: str = TECHNIQUE
    dtypes: list[str] = field(default_factory=lambda: ["float32"])  # the one dtype the servers load
    load: LoadWorkload = field(default_factory=LoadWorkload)
    engine: dict[str, Any] = field(default_factory=dict)  # EngineConfig fields of every server's engine
    server: dict[str, Any] = field(default_factory=dict)  # the HTTP server's own options (kvlab serve)
    ray_replicas: list[int] = field(default_factory=list)  # also Ray Serve with each number of replicas
    ray_cpus: int | None = None  # of a local Ray cluster (None: all cores); unset with $RAY_ADDRESS
    replica_cpus: int = 1  # CPUs (and torch threads) each Ray Serve replica reserves
    startup_timeout_s: float = 900.0  # a server's start, model load and kernel build included

    def validate(self) -> None:
        if self.technique != TECHNIQUE:
            raise ConfigError(f"this config is for technique {self.technique!r}, not {TECHNIQUE!r}")
        self.validate_common()
        if len(self.dtypes) != 1:
            raise ConfigError(f"the serving bench serves one dtype; dtypes must name one, got {self.dtypes}")
        if self.method != "both":
            raise ConfigError(
                f"the serving bench has no baseline/optimized split; method must be 'both', got {self.method!r}"
            )
        self.load.validate()
        check_context(
            self.model, self.load.prompt_len_max + self.load.output_len_max, "load's longest request"
        )
        if not isinstance(self.ray_replicas, list) or len(set(self.ray_replicas)) != len(self.ray_replicas):
            raise ConfigError(
                f"ray_replicas must be a list of distinct replica counts, got {self.ray_replicas!r}"
            )
        for count in self.ray_replicas:
            positive("ray_replicas[]", count)
        if self.ray_replicas and importlib.util.find_spec("ray") is None:
            raise ConfigError("ray_replicas needs Ray: pip install 'kvlab[ray]' (or set ray_replicas: [])")
        if self.ray_cpus is not None:
            positive("ray_cpus", self.ray_cpus)
        positive("replica_cpus", self.replica_cpus)
        if not isinstance(self.startup_timeout_s, (int, float)) or not self.startup_timeout_s > 0:
            raise ConfigError(f"startup_timeout_s must be > 0, got {self.startup_timeout_s!r}")
        self.engine_config()  # unknown or bad engine keys fail here, before any server starts
        self.check_server()

    def check_server(self) -> None:
        """`server` holds kvlab serve's own options; the bench sets the model, engine, threads and
        address itself, and a bad option fails here (ServerConfig's check), before any server starts."""
        from kvlab.server.config import ServerConfig

        for key in ("model", "engine", "threads", "host", "port"):
            if key in self.server:
                raise ConfigError(
                    f"server.{key} is set by the bench (model, engine, threads); the address is chosen at start"
                )
        ServerConfig.from_dict(self.server)

    def engine_config(self) -> EngineConfig:
        for key in ("dtype", "device"):
            if key in self.engine:
                raise ConfigError(f"engine.{key} is set at the top level of the serving bench config")
        return EngineConfig.from_dict({**self.engine, "dtype": self.dtypes[0], "device": self.device})


def from_dict(data: dict[str, Any]) -> LoadBenchConfig:
    """Build a LoadBenchConfig, rejecting unknown keys at any level."""
    data = dict(data)
    load = take_section(data, "load", LoadWorkload)
    check_keys("", data, LoadBenchConfig)
    as_lists(data, ("dtypes", "ray_replicas"))
    for key in ("engine", "server"):
        if not isinstance(data.get(key, {}), dict):
            raise ConfigError(f"{key} must be a mapping, got {data[key]!r}")
    return LoadBenchConfig(**data, load=load)


def resolve(
    batch_level: str, config_file: str | Path | None, overrides: list[str], flags: dict[str, Any]
) -> LoadBenchConfig:
    """Layer defaults < configs/serving/<level>.yaml (or `config_file`) < --set < flags, then validate."""
    config = from_dict(layer(TECHNIQUE, batch_level, config_file, overrides, flags, PRESETS))
    config.validate()
    return config
