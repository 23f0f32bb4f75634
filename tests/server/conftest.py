import dataclasses

import httpx
import pytest
from conftest import load_tiny

from kvlab.engine.async_engine import AsyncLLM

from .helpers import MODEL, serve_app


@dataclasses.dataclass
class TinyModel:
    loaded: object

    def engine(self, **overrides) -> AsyncLLM:
        return AsyncLLM(self.loaded, **({"num_blocks": 256, "block_size": 16} | overrides))


@pytest.fixture(scope="session")
def tiny():
    """tiny-llama with context-dependent outputs: random weights, SmolLM2's tokenizer and chat template."""
    return TinyModel(load_tiny(MODEL))


@pytest.fixture(scope="module")
def server(tiny):
    """One server shared by a module's tests, which leave it as they found it."""
    with serve_app(tiny.engine()) as thread:
        yield thread


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        yield http
