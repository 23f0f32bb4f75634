"""Running the server: load the engine, build the app, serve it with uvicorn, drain on SIGTERM.

Model loading is separate from the app (`load_engine`), so a Ray Serve replica builds the same app on
an engine it loads itself.

Shutdown: the first SIGTERM (or Ctrl-C) starts a drain: /ready and new requests answer 503 while the
listening socket stays open (a load balancer sees "not ready", not "connection refused"), requests in
flight get drain_timeout_s to finish, the rest are aborted, then uvicorn closes and the process exits 0.
A second signal skips the rest of the drain.
"""

import asyncio
import logging
import signal

import uvicorn

from kvlab.engine.async_engine import AsyncLLM
from kvlab.server.app import build_app
from kvlab.server.config import ServerConfig

logger = logging.getLogger("kvlab.server")

# uvicorn's own backstop once the drain is over: connections still open after it are closed.
GRACEFUL_SHUTDOWN_S = 5


def load_engine(config: ServerConfig) -> AsyncLLM:
    """The model and engine the config names, with the CPU kernels built and calibrated now, before
    the server reports ready (a first build takes a while and would otherwise fall in a request)."""
    import torch

    from kvlab.kernels import cpu as cpu_kernels

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    llm = AsyncLLM(config.model, config.engine)
    cpu_kernels.prepare()
    return llm


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first exit signal drains the app before uvicorn's own shutdown."""

    def __init__(self, config: uvicorn.Config, drain):
        super().__init__(config)
        self._drain = drain  # async () -> bool: the app's ServerState.drain
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        # Not uvicorn's handler: it would re-raise the signal after shutdown, and SIGTERM's default
        # action would end the process with -15 instead of 0 after a clean drain.
        if self._drain_task is not None or self._loop is None:
            self.should_exit = True  # a second signal: stop now
            return
        logger.info("received %s: draining", signal.Signals(sig).name)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        async def drain_then_exit() -> None:
            try:
                await self._drain()
            finally:
                self.should_exit = True

        self._drain_task = asyncio.ensure_future(drain_then_exit())


def serve(config: ServerConfig, log_level: str = "info") -> None:
    """Load the engine, serve until a signal, drain, exit. Bad config surfaces before any loading."""
    config.api_key()  # an unset key variable fails here, before the model loads
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(message)s")
    logger.info("serve config: %s", config.to_dict())
    llm = load_engine(config)
    app = build_app(llm, config)
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        lifespan="on",
    )
    DrainingServer(uv_config, app.state.kvlab.drain).run()
