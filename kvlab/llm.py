"""LLM: offline batch generation on the serving engine.

llm = LLM("tiny-llama", num_blocks=128, pd_policy="hybrid")
outputs = llm.generate(["Hello", "The capital of France is"], SamplingParams(max_tokens=16))
outputs = llm.generate(prompts, params, press=RequestPress(get_press("streaming_llm"), max_cache_tokens=256))
"""

from kvlab.engine.compression import RequestPress
from kvlab.engine.config import EngineConfig
from kvlab.engine.llm_engine import EngineStats, LLMEngine, RequestOutput
from kvlab.engine.request import SamplingParams
from kvlab.models.loader import LoadedModel


class LLM:
    def __init__(self, model: str | LoadedModel, config: EngineConfig | None = None, **overrides):
        """`model`: a kvlab model name, hub id, local directory, .gguf file or a LoadedModel;
        `overrides`: EngineConfig fields (unknown names raise ConfigError)."""
        self.engine = LLMEngine.from_model(model, config, **overrides)

    def generate(
        self,
        prompts: str | list[int] | list[str | list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        press: RequestPress | None = None,
    ) -> list[RequestOutput]:
        """One finished output per prompt, in order. A prompt is text or a list of token ids.
        `press`: KV compression for every prompt (see kvlab.engine.compression)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self.engine.generate(list(prompts), sampling_params, press)

    def get_stats(self) -> EngineStats:
        return self.engine.get_stats()
