"""Engine greedy == Hugging Face `generate` greedy, token for token, on the tiny random models."""

import random

import pytest
import torch

from kvlab.engine.llm_engine import LLMEngine
from kvlab.engine.request import SamplingParams
from kvlab.llm import LLM

MAX_TOKENS = 8


def hf_greedy(loaded, prompt: list[int], max_tokens: int = MAX_TOKENS) -> list[int]:
    with torch.no_grad():
        out = loaded.model.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_tokens,
            do_sample=False,
            attention_mask=torch.ones(1, len(prompt)),
        )
    return out[0, len(prompt) :].tolist()


def prompts_of(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, 49000) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def expected(tiny_model):
    prompts = prompts_of([3, 17, 40, 9])
    return prompts, [hf_greedy(tiny_model, p) for p in prompts]


def test_single_requests_match_hf_greedy(tiny_model, expected):
    prompts, reference = expected
    engine = LLMEngine.from_model(tiny_model, block_size=4, num_blocks=64)
    for prompt, tokens in zip(prompts[:2], reference[:2], strict=True):
        (output,) = engine.generate([prompt], SamplingParams(max_tokens=MAX_TOKENS))
        assert output.output_token_ids == tokens


@pytest.mark.parametrize("policy", ["strict", "hybrid"])
def test_mixed_batch_with_chunked_prefill_matches_hf_greedy(tiny_model, expected, policy):
    prompts, reference = expected
    llm = LLM(tiny_model, block_size=4, num_blocks=64, max_num_batched_tokens=16, pd_policy=policy)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS))
    assert [o.output_token_ids for o in outputs] == reference


def test_tiny_pool_preempts_and_matches_a_roomy_pool(tiny_model, expected):
    prompts, reference = expected
    engine = LLMEngine.from_model(tiny_model, block_size=4, num_blocks=14, attention_backend="sdpa")
    outputs = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS))
    assert engine.get_stats().num_preemptions > 0
    assert [o.output_token_ids for o in outputs] == reference


def test_prefix_cache_hit_skips_recomputation(tiny_model):
    shared = prompts_of([32], seed=3)[0]
    prompts = [shared + [11, 12, 13], shared + [21, 22]]
    engine = LLMEngine.from_model(tiny_model, block_size=8, num_blocks=64)
    first = engine.generate([prompts[0]], SamplingParams(max_tokens=4))[0]
    engine.add_request(prompts[1], SamplingParams(max_tokens=4))
    scheduled = engine.scheduler.schedule()
    assert scheduled.scheduled[0].start == 32 and scheduled.num_batched_tokens == 2
    engine.scheduler.update(scheduled, engine.runner.execute(scheduled))
    finals = []
    while engine.has_unfinished_requests():
        finals += [o for o in engine.step() if o.finished]
    assert engine.get_stats().prefix_cache_hit_rate > 0.4
    assert first.output_token_ids == hf_greedy(tiny_model, prompts[0], 4)
    assert finals[0].output_token_ids == hf_greedy(tiny_model, prompts[1], 4)


def test_an_engine_takes_the_dtype_of_a_model_loaded_for_it(tiny_model):
    # The KV cache follows the weights' dtype when the caller names none; a different one is refused
    # at construction (it failed inside the first step, in the attention backend's copy into the cache).
    import copy
    import dataclasses

    from kvlab.errors import ConfigError

    loaded = dataclasses.replace(tiny_model, model=copy.deepcopy(tiny_model.model).to(torch.bfloat16))
    engine = LLMEngine.from_model(loaded, block_size=4, num_blocks=64)
    assert engine.config.dtype == "bfloat16"
    (output,) = engine.generate([prompts_of([9])[0]], SamplingParams(max_tokens=4))
    assert len(output.output_token_ids) == 4
    with pytest.raises(ConfigError, match="weights are float32 but the engine's dtype is bfloat16"):
        LLMEngine.from_model(tiny_model, block_size=4, num_blocks=64, dtype="bfloat16")
