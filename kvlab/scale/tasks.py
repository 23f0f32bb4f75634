"""Independent calls as Ray tasks, one per worker, results returned in order (a sweep's cells).

Each call reserves `cpus` of the cluster's CPUs, and Ray caps a task's OpenMP/torch threads at its
reservation, so cells that run side by side do not oversubscribe the machine. Arguments go through
Ray's object store once per distinct object (`shared`), not once per task.
"""

from collections.abc import Callable, Sequence
from typing import Any

from kvlab.errors import KvlabError
from kvlab.scale.cluster import import_ray


def run_as_tasks(
    function: Callable[..., Any],
    calls: Sequence[tuple[Any, ...]],
    cpus: Sequence[int],
    shared: tuple[Any, ...] = (),
) -> list[Any]:
    """[function(*call, *shared) for call in calls], each call a Ray task of `cpus[i]` CPUs. Needs a
    Ray runtime (kvlab.scale.cluster.ray_session). A kvlab error raised in a task is raised here as
    itself, so the CLI reports it as it would without Ray."""
    ray = import_ray()
    if len(cpus) != len(calls):
        raise ValueError(f"{len(calls)} calls but {len(cpus)} CPU reservations")
    remote = ray.remote(function)
    shared_refs = [ray.put(value) for value in shared]
    refs = [
        remote.options(num_cpus=n, max_retries=0).remote(*call, *shared_refs)
        for call, n in zip(calls, cpus, strict=True)
    ]
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, KvlabError):
            raise error.cause from None
        raise
