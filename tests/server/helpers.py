"""Running the server in tests: uvicorn in a background thread (in-process, so a test can reach the
app's state and slow its engine) or `kvlab serve` in a subprocess (signals, the real CLI)."""

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from kvlab.engine.async_engine import AsyncLLM
from kvlab.server import ServerConfig, build_app

MODEL = "tiny-llama"
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` on its own event loop in a thread, as `kvlab serve` runs it less the
    signal handling (only the main thread may install handlers; the drain is called directly)."""

    def __init__(self, app, port: int):
        self.app = app
        self.base_url = f"http://127.0.0.1:{port}"
        # log_config=None: uvicorn's loggers propagate to the root logger, where caplog listens.
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
        self.server = uvicorn.Server(config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self.server.serve(),))

    @property
    def state(self):
        return self.app.state.kvlab

    def start(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def call(self, coroutine, timeout: float = 60):
        """Run a coroutine on the server's loop (e.g. the app's drain) and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stats(self):
        return self.state.llm.get_stats()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.loop.close()


@contextlib.contextmanager
def serve_app(llm: AsyncLLM, model: str = MODEL, **config):
    """A started ServerThread around `llm` (ServerConfig fields in `config`), stopped afterwards."""
    thread = ServerThread(build_app(llm, ServerConfig(model=model, **config)), free_port()).start()
    try:
        yield thread
    finally:
        thread.stop()


def wait_until(predicate, timeout: float = 20, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def slow_steps(llm: AsyncLLM, seconds: float) -> None:
    """Make every engine step take at least `seconds` longer (steps run in a worker thread), so that a
    request is still in flight when the test acts on it."""
    step = llm.engine.step

    def slow_step():
        time.sleep(seconds)
        return step()

    llm.engine.step = slow_step


def kvlab_process(args: list[str], slow_step_s: float = 0.0, env: dict | None = None) -> subprocess.Popen:
    """`kvlab ARGS` in a subprocess, every engine step slowed by `slow_step_s`; output to one pipe."""
    code = (
        "import sys, time\n"
        "from kvlab.engine.llm_engine import LLMEngine\n"
        f"if {slow_step_s!r}:\n"
        "    step = LLMEngine.step\n"
        f"    LLMEngine.step = lambda self: (time.sleep({slow_step_s!r}), step(self))[1]\n"
        "from kvlab.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_ready(base_url: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{process.stdout.read()}")
        try:
            if httpx.get(f"{base_url}/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"server did not become ready:\n{process.stdout.read()}")


def scrape(base_url: str) -> dict[tuple[str, tuple], float]:
    """/metrics parsed by prometheus_client's own parser: (sample name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def requests_counted(metrics: dict, endpoint: str, status: int) -> float:
    return metrics.get(("kvlab_requests_total", (("endpoint", endpoint), ("status", str(status)))), 0.0)


def sse_data(lines) -> list[str]:
    """The `data:` payloads of an SSE stream's lines."""
    return [line[len("data: ") :] for line in lines if line.startswith("data: ")]


def chat_prompt_ids(tokenizer, content: str) -> list[int]:
    """What the server feeds the engine for one user message: the chat template's text, tokenised
    without adding special tokens again."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer.encode(text, add_special_tokens=False)
