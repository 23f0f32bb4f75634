"""Attention backends by name. A new backend is one file with `@register_backend("name")` and one
line in BUILTIN_MODULES below.

    backend = get_backend("auto")           # triton on CUDA (if importable), cpu_paged on CPU (if it
                                            # compiled), else sdpa
    backend = get_backend("tiled", block_m=32, block_n=64)
"""

import importlib
import inspect

import torch

from kvlab.errors import ConfigError

BUILTIN_MODULES = (
    "kvlab.attention.backends.reference",
    "kvlab.attention.backends.tiled",
    "kvlab.attention.backends.sdpa",
    "kvlab.attention.backends.cpu_paged",
    "kvlab.attention.backends.triton_paged",
)

_BACKENDS: dict[str, type] = {}


def register_backend(name: str):
    """Class decorator: make an AttentionBackend subclass constructible by `get_backend(name)`."""

    def decorate(cls: type) -> type:
        if name in _BACKENDS and _BACKENDS[name] is not cls:
            raise ConfigError(f"attention backend {name!r} is registered twice")
        cls.name = name
        _BACKENDS[name] = cls
        return cls

    return decorate


def _backends() -> dict[str, type]:
    # Imported on first use, so that importing kvlab loads no backend (and never triton).
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    return _BACKENDS


def list_backends() -> list[str]:
    """Registered names, plus "auto"."""
    return [*sorted(_backends()), "auto"]


def get_backend(name: str = "auto", device: torch.device | str | None = None, **options):
    """An AttentionBackend instance. `options` go to the backend's constructor; unknown ones raise."""
    backends = _backends()
    if name == "auto":
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda":
            name = "triton" if backends["triton"].is_available(device) else "sdpa"
        else:
            name = "cpu_paged" if backends["cpu_paged"].is_available(device) else "sdpa"
    if name not in backends:
        raise ConfigError(f"unknown attention backend {name!r}; valid names: {', '.join(list_backends())}")
    cls = backends[name]
    accepted = set(inspect.signature(cls).parameters)
    unknown = set(options) - accepted
    if unknown:
        valid = ", ".join(sorted(accepted)) or "none"
        raise ConfigError(f"unknown option(s) {sorted(unknown)} for backend {name!r}; valid options: {valid}")
    if device is not None and not cls.is_available(torch.device(device)):
        raise ConfigError(f"attention backend {name!r} is not available on {device} here")
    return cls(**options)
