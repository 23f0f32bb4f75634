"""kvlab: faster, smaller LLM inference, proved by side-by-side measurements."""

from kvlab.engine.async_engine import AsyncLLM
from kvlab.engine.compression import RequestPress
from kvlab.engine.request import SamplingParams
from kvlab.errors import ConfigError, KvlabError, ModelUnavailableError, PromptTooLongError
from kvlab.generate import GenerationResult, generate
from kvlab.llm import LLM
from kvlab.models.loader import load_model
from kvlab.press.registry import get_press, list_presses
from kvlab.sampling import SamplingConfig

__all__ = [
    "LLM",
    "AsyncLLM",
    "ConfigError",
    "GenerationResult",
    "KvlabError",
    "ModelUnavailableError",
    "PromptTooLongError",
    "RequestPress",
    "SamplingConfig",
    "SamplingParams",
    "generate",
    "get_press",
    "list_presses",
    "load_model",
]
