"""kvlab: faster, smaller LLM inference, proved by side-by-side measurements."""

from kvlab.errors import ConfigError, KvlabError, ModelUnavailableError, PromptTooLongError
from kvlab.generate import GenerationResult, SamplingConfig, generate
from kvlab.models.loader import load_model

__all__ = [
    "ConfigError",
    "GenerationResult",
    "KvlabError",
    "ModelUnavailableError",
    "PromptTooLongError",
    "SamplingConfig",
    "generate",
    "load_model",
]
