"""The one place kvlab starts or joins a Ray runtime.

`ray_session()` joins the cluster at `$RAY_ADDRESS` when it is set, else starts a local one of
`num_cpus` CPUs; a runtime that is already initialised (a test's fixture, a user's script) is used as
is and left running. Workers of a local cluster get the driver's kvlab first on their path, so a
checkout that is not the installed one (a git worktree, `python -m` from a source tree) runs the same
code in the workers as in the driver, and the environment variables that locate kvlab's data and
caches, so a worker never downloads what the driver reads from disk.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kvlab.errors import ConfigError

ADDRESS_ENV = "RAY_ADDRESS"
# Where kvlab and Hugging Face look for data, converted models, built kernels; whether the hub is off.
FORWARDED_ENV = ("KVLAB_CACHE", "KVLAB_DATA_DIR", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("Ray is not installed; pip install 'kvlab[ray]' (ray[serve])") from None
    return ray


def worker_env() -> dict[str, str]:
    """Environment variables for the workers of a local cluster (see the module docstring)."""
    source_root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (source_root, os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path} | {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}


@contextmanager
def ray_session(num_cpus: int | None = None) -> Iterator[None]:
    """Ray for the duration of the block (see the module docstring); `num_cpus`: of a local cluster
    (None: all cores). A cluster that is joined has the size it has, so `num_cpus` is then an error."""
    ray = import_ray()
    if num_cpus is not None and (isinstance(num_cpus, bool) or num_cpus <= 0):
        raise ConfigError(f"num_cpus of a local Ray cluster must be a positive integer, got {num_cpus!r}")
    if ray.is_initialized():
        yield
        return
    if os.environ.get(ADDRESS_ENV):
        if num_cpus is not None:
            raise ConfigError(
                f"${ADDRESS_ENV} names a cluster to join; its size is its own (drop --ray-cpus)"
            )
        ray.init(address=os.environ[ADDRESS_ENV], log_to_driver=True)
    else:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            runtime_env={"env_vars": worker_env()},
            log_to_driver=True,
        )
    try:
        yield
    finally:
        ray.shutdown()
