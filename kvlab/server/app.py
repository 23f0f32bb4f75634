"""build_app: the OpenAI-compatible FastAPI app around an AsyncLLM that is already loaded.

    llm = load_engine(config)          # kvlab.server.launch: model loading stays out of the app
    app = build_app(llm, config)       # uvicorn (kvlab serve), Ray Serve or a test client run it

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models (these three need the API key
when one is configured), GET /health (liveness: the engine driver is alive), GET /ready (readiness:
alive and not draining), GET /metrics (Prometheus text). The app owns the engine from here on: it
shuts it down with the app.
"""

import hmac
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from kvlab.engine.async_engine import AsyncLLM
from kvlab.server.admission import Admission
from kvlab.server.config import ServerConfig
from kvlab.server.errors import ApiError, install_handlers
from kvlab.server.handlers import Generation
from kvlab.server.metrics import ServerMetrics

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/ready", "/metrics")


class ServerState:
    """What a running app holds (app.state.kvlab): other code (launch.py's drain, tests) reaches it here."""

    def __init__(self, llm: AsyncLLM, config: ServerConfig, model_name: str):
        self.llm = llm
        self.config = config
        self.model_name = model_name
        self.created = int(time.time())
        self.admission = Admission(config.max_queue)
        self.metrics = ServerMetrics(llm.get_stats)
        self.api_key = config.api_key()
        self.generation = Generation(
            llm,
            model_name,
            self.admission,
            self.metrics,
            config.max_body_bytes,
            config.press.build() if config.press else None,
        )

    @property
    def is_ready(self) -> bool:
        return self.llm.is_running and not self.admission.draining

    async def drain(self) -> bool:
        """Refuse new requests (503, readiness false) and let those in flight finish within the
        configured drain_timeout_s; aborts the rest. True when all finished in time."""
        return await self.admission.drain(self.config.drain_timeout_s, self.llm.abort)


class RequestCounter:
    """ASGI middleware: counts every answer by endpoint and status (kvlab_requests_total), refusals
    and errors included. Other paths are one "other" label, so a scanner cannot grow the label set."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = None

        async def send_and_note(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
            self.metrics.requests.labels(endpoint, str(status or 500)).inc()


def build_app(llm: AsyncLLM, config: ServerConfig, model_name: str | None = None) -> FastAPI:
    """`model_name`: the name clients send and /v1/models lists (default: config.model). Reads the API
    key from the environment now (ConfigError if api_key_env names an unset variable)."""
    state = ServerState(llm, config, model_name or config.model)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await llm.shutdown()

    app = FastAPI(title="kvlab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.kvlab = state
    app.add_middleware(RequestCounter, metrics=state.metrics)
    install_handlers(app)

    def authorize(request: Request) -> None:
        if state.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken does not reveal how much of a guess was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), state.api_key.encode()):
            raise ApiError(
                401,
                "missing or incorrect API key (send Authorization: Bearer <key>)",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(request: Request) -> Response:
        return await state.generation.completions(request)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(request: Request) -> Response:
        return await state.generation.chat(request)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict:
        card = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "kvlab"}
        return {"object": "list", "data": [card | {"max_model_len": llm.engine.config.max_model_len}]}

    @app.get("/health")
    async def health() -> Response:
        if not llm.is_running:
            return ApiError(503, "the engine is not running", type="service_unavailable").response()
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> Response:
        if not state.is_ready:
            return ApiError(
                503, "not ready (draining or engine stopped)", type="service_unavailable"
            ).response()
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    return app
