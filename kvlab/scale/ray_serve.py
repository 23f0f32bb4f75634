"""Ray Serve replicas of kvlab's OpenAI server: the same FastAPI app `kvlab serve` runs, each replica
a Ray actor (its own process) with its own engine, Ray's HTTP proxy spreading requests over them.

    with ray_session(num_cpus=2), serve_replicas({"model": "smollm2-135m"}, num_replicas=2) as url:
        openai.OpenAI(base_url=f"{url}/v1", api_key="-").completions.create(...)

or, with Ray's own CLI (an application builder): `serve run kvlab.scale.ray_serve:build
config=serve.yaml num_replicas=2`. Every response names the replica that served it in the
`x-kvlab-replica` header (Ray's replica id and the process id), so a client can tell them apart.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ray import serve

from kvlab.errors import ConfigError

APP_NAME = "kvlab"
REPLICA_HEADER = "x-kvlab-replica"
# Ray Serve's default (5 requests in flight per replica) would queue requests in Ray's proxy that the
# engine could batch; the server's own bounded queue (429 when full) is the limit that should answer.
DEFAULT_MAX_ONGOING_REQUESTS = 1024
# Ray Serve's controller, proxy and replicas log every request at INFO; kvlab's /metrics counts them.
QUIET = {"log_level": "WARNING", "enable_access_log": False}


@serve.ingress()  # the app is built per replica, after __init__ (__serve_build_asgi_app__)
class OpenAIReplica:
    """One replica: the engine a `ServerConfig` names (kvlab.server.launch.load_engine: model, engine
    options, torch threads, kernels prepared) and the server's app on it."""

    def __init__(self, server_config: dict[str, Any]):
        from kvlab.server.config import ServerConfig
        from kvlab.server.launch import load_engine

        self.config = ServerConfig.from_dict(server_config)
        self.llm = load_engine(self.config)
        self.replica = f"{serve.get_replica_context().replica_id.unique_id} pid {os.getpid()}"

    def __serve_build_asgi_app__(self):
        from kvlab.server.app import build_app

        app = build_app(self.llm, self.config)  # its lifespan shuts the engine down with the replica
        app.add_middleware(ReplicaAdapter, replica=self.replica)
        return app


class ReplicaAdapter:
    """ASGI middleware between Ray Serve and the app. It adds REPLICA_HEADER to every response, and
    turns Ray's way of saying the client left (its `receive` raises TaskCancelledError once the proxy
    cancels the request) into ASGI's (an http.disconnect message), so the server aborts the request
    as it does under uvicorn instead of failing it as an internal error. Plain ASGI rather than an
    `@app.middleware` function, which would wrap streamed responses."""

    def __init__(self, app, replica: str):
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from ray.exceptions import TaskCancelledError

        async def receive_or_disconnect():
            try:
                return await receive()
            except TaskCancelledError:
                return {"type": "http.disconnect"}

        async def send_with_header(message) -> None:
            if message["type"] == "http.response.start":
                message = message | {"headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive_or_disconnect, send_with_header)


def application(
    server_config: dict[str, Any],
    num_replicas: int,
    replica_cpus: int = 1,
    max_ongoing_requests: int = DEFAULT_MAX_ONGOING_REQUESTS,
):
    """The Ray Serve application: `num_replicas` replicas of `replica_cpus` CPUs (and as many torch
    threads) each, every one serving `server_config` (serve.yaml's keys; host and port are Ray's)."""
    for name, value in (
        ("num_replicas", num_replicas),
        ("replica_cpus", replica_cpus),
        ("max_ongoing_requests", max_ongoing_requests),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    from kvlab.server.config import ServerConfig

    server_config = {key: v for key, v in server_config.items() if key not in ("host", "port")}
    server_config["threads"] = replica_cpus
    ServerConfig.from_dict(server_config)  # a bad key fails here, not in every replica
    deployment = serve.deployment(
        OpenAIReplica,
        name="OpenAIReplica",
        num_replicas=num_replicas,
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": replica_cpus},
        logging_config=QUIET,
    )
    return deployment.bind(server_config)


def build(args: dict[str, str]):
    """Application builder for Ray's CLI: `serve run kvlab.scale.ray_serve:build config=serve.yaml
    num_replicas=2 [replica_cpus=1]` (values arrive as strings; `config`: a `kvlab serve` YAML)."""
    from kvlab.bench.core.config import read_yaml

    known = {"config", "num_replicas", "replica_cpus"}
    if set(args) - known or "config" not in args:
        raise ConfigError(f"expected config=serve.yaml [num_replicas=N] [replica_cpus=C]; got {sorted(args)}")
    return application(
        read_yaml(Path(args["config"])),
        int(args.get("num_replicas", 1)),
        replica_cpus=int(args.get("replica_cpus", 1)),
    )


@contextmanager
def serve_replicas(
    server_config: dict[str, Any],
    num_replicas: int,
    replica_cpus: int = 1,
    host: str = "127.0.0.1",
    port: int = 8000,
) -> Iterator[str]:
    """Run the application on the caller's Ray runtime (kvlab.scale.cluster.ray_session) until the
    block ends; yields the proxy's base URL once every replica is up. Serve is shut down on exit."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    if num_replicas * replica_cpus > cpus:  # Serve would wait for the CPUs forever
        raise ConfigError(
            f"{num_replicas} replicas of {replica_cpus} CPU(s) need {num_replicas * replica_cpus} CPUs; "
            f"the Ray cluster has {cpus:g}"
        )
    serve.start(http_options={"host": host, "port": port}, logging_config=QUIET)
    try:
        serve.run(
            application(server_config, num_replicas, replica_cpus),
            name=APP_NAME,
            route_prefix="/",
            blocking=False,
        )
        yield f"http://{host}:{port}"
    finally:
        serve.shutdown()
