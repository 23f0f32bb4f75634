"""The server under test, started for the bench and stopped after it.

`kvlab serve` runs as a subprocess, the way it is deployed: the clients reach it over a real socket,
and its engine, event loop and GIL are its own, not shared with the load generator's (an in-process
uvicorn thread would make the clients' JSON parsing and the server's steps contend for one GIL and
blur whose time a latency is). The subprocess gets this process's kvlab first on its path, so a
checkout that is not the installed one serves its own code. Ray Serve replicas are started by
kvlab.scale.ray_serve.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from kvlab.errors import KvlabError

READY_PATH = "/ready"
STOP_TIMEOUT_S = 60.0  # SIGTERM drains in-flight requests (the server bounds it); then SIGKILL


class ServerStartError(KvlabError):
    """The server exited, or did not answer ready in time; the message ends with its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS's choice); the server binds it right away."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@contextmanager
def kvlab_serve(serve_config: dict[str, Any], workdir: Path, startup_timeout_s: float) -> Iterator[str]:
    """`kvlab serve --config <workdir>/serve.yaml` (`serve_config`: the server's YAML keys; host and
    port are chosen here) until the block ends; yields its base URL once it answers ready."""
    host, port = "127.0.0.1", free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "serve.yaml"
    config_path.write_text(yaml.safe_dump(serve_config | {"host": host, "port": port}, sort_keys=False))
    log_path = workdir / "server.log"
    source_root = str(Path(__file__).resolve().parents[3])
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join(filter(None, [source_root, os.environ.get("PYTHONPATH")]))
    }
    command = [sys.executable, "-m", "kvlab.cli", "serve", "--config", str(config_path)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://{host}:{port}"
    try:
        wait_ready(url, lambda: process.poll() is None, startup_timeout_s, log_path)
        yield url
    finally:
        stop(process)


def wait_ready(url: str, is_alive, timeout_s: float, log_path: Path | None = None) -> None:
    """Poll `url`/ready until it answers 200; ServerStartError if the server dies or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not is_alive():
            raise ServerStartError(f"the server at {url} exited during startup{_log_tail(log_path)}")
        try:
            if httpx.get(url + READY_PATH, timeout=5.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.5)
    raise ServerStartError(f"the server at {url} was not ready within {timeout_s:.0f} s{_log_tail(log_path)}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _log_tail(log_path: Path | None, num_lines: int = 30) -> str:
    if log_path is None or not log_path.exists():
        return ""
    lines = log_path.read_text(errors="replace").splitlines()[-num_lines:]
    return "; its log ends:\n" + "\n".join(lines)
