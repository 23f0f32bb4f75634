"""kvlab serve: an OpenAI-compatible HTTP server on AsyncLLM (see app.py for the routes)."""

from kvlab.server.app import build_app
from kvlab.server.config import ServerConfig

__all__ = ["ServerConfig", "build_app"]
