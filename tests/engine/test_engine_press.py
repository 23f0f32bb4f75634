"""A press inside the engine: compressing a running request frees blocks, and its greedy output equals
the HF path's (`PressCache` with `kvlab.generate` / `model.generate`) on the same prompt."""

import random

import pytest
import torch

from kvlab.engine.compression import RequestPress
from kvlab.engine.llm_engine import LLMEngine
from kvlab.engine.request import SamplingParams
from kvlab.errors import ConfigError
from kvlab.generate import generate
from kvlab.models.loader import load_model
from kvlab.press import get_press
from kvlab.press.hf import PressCache

PROMPT_LEN, NEW, BLOCK = 40, 8, 4
PRESSES = [("snapkv", {"window": 8}), ("knorm", {}), ("random", {"seed": 3})]


def context_sensitive(name: str):
    """A tiny model with its matrices redrawn at std 0.3: at the default init every prompt decodes to
    one repeated token, so dropping tokens could not change the output and equality would prove nothing."""
    loaded = load_model(name)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in loaded.model.parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return loaded


@pytest.fixture(scope="module")
def llama():
    return context_sensitive("tiny-llama")


@pytest.fixture(scope="module")
def neox():
    return context_sensitive("tiny-gpt-neox")


def plain_greedy(loaded, prompt: list[int]) -> list[int]:
    return generate(loaded.model, torch.tensor([prompt]), NEW).tokens[0].tolist()


def prompt_of(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 49000) for _ in range(length)]


def hf_press_greedy(
    loaded, prompt: list[int], press, use_model_generate: bool = False, **budget
) -> list[int]:
    cache = PressCache(press, loaded.model, **budget)
    ids = torch.tensor([prompt])
    with cache.hooks(loaded.model), torch.inference_mode():
        if use_model_generate:
            out = loaded.model.generate(
                ids, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0, cache=cache
            )
            return out[0, len(prompt) :].tolist()
        return generate(loaded.model, ids, NEW, cache=cache).tokens[0].tolist()


@pytest.mark.parametrize("arch", ["llama", "neox"])
@pytest.mark.parametrize("name, options", PRESSES)
def test_compression_frees_blocks_and_output_equals_hf_press(request, arch, name, options):
    model = request.getfixturevalue(arch)
    prompt = prompt_of(PROMPT_LEN, seed=1)
    press = get_press(name, **options)
    expected = hf_press_greedy(model, prompt, press, compression_ratio=0.5)
    assert expected != plain_greedy(model, prompt)  # the press matters for this prompt
    engine = LLMEngine.from_model(model, block_size=BLOCK, num_blocks=64)
    params = SamplingParams(max_tokens=NEW, ignore_eos=True)
    engine.add_request(prompt, params, press=RequestPress(press, compression_ratio=0.5))
    engine.step()  # the whole prompt in one step; the press runs right after it
    stats = engine.get_stats()
    kept = PROMPT_LEN // 2
    assert stats.num_used_blocks == kept // BLOCK  # was PROMPT_LEN // BLOCK before compaction
    assert stats.num_press_evicted_tokens == PROMPT_LEN - kept
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.finished]
    assert engine.get_stats().num_used_blocks == 0
    (output,) = outputs
    assert output.output_token_ids == expected
    engine.scheduler.kv.pool.check_invariants()


def test_chunked_prefill_records_every_chunk_and_a_plain_neighbour_is_untouched(llama):
    """SnapKV's window spans prefill chunks; a request without a press in the same batch matches plain HF."""
    pressed, plain = prompt_of(PROMPT_LEN, seed=2), prompt_of(23, seed=3)
    press = get_press("snapkv", window=12)
    expected = hf_press_greedy(llama, pressed, press, use_model_generate=True, max_cache_tokens=16)
    assert expected != plain_greedy(llama, pressed)
    with torch.inference_mode():
        reference = llama.model.generate(
            torch.tensor([plain]), max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    engine = LLMEngine.from_model(llama, block_size=BLOCK, num_blocks=64, max_num_batched_tokens=16)
    params = SamplingParams(max_tokens=NEW, ignore_eos=True)
    ids = [
        engine.add_request(pressed, params, press=RequestPress(press, max_cache_tokens=16)),
        engine.add_request(plain, params),
    ]
    final = {}
    while engine.has_unfinished_requests():
        final |= {o.request_id: o.output_token_ids for o in engine.step() if o.finished}
    assert final[ids[0]] == expected
    assert final[ids[1]] == reference[0, len(plain) :].tolist()
    assert engine.get_stats().num_press_evicted_tokens == PROMPT_LEN - 16
    assert not engine.runner.recorded_queries


@pytest.mark.parametrize("arch", ["llama", "neox"])
@pytest.mark.parametrize(
    "prompt_len, budget",
    [(PROMPT_LEN, 13), (10, 14)],
    ids=["prompt-over-budget", "decode-fills-budget"],
)
def test_streaming_llm_runs_as_a_ring_and_equals_the_hf_press(request, arch, prompt_len, budget):
    """Over budget after prefill: compacted to sinks + window, then every decode token overwrites the
    oldest window slot. Under it: decode appends until the budget, then the ring starts. Either way
    the request never holds more than the budget's blocks, and greedy output equals PressCache's."""
    model = request.getfixturevalue(arch)
    prompt = prompt_of(prompt_len, seed=5)
    new = 16
    press = get_press("streaming_llm", n_sink=2)
    cache = PressCache(press, model.model, max_cache_tokens=budget)
    expected = generate(model.model, torch.tensor([prompt]), new, cache=cache).tokens[0].tolist()
    plain = generate(model.model, torch.tensor([prompt]), new).tokens[0].tolist()
    assert expected != plain  # the eviction matters for these tokens
    engine = LLMEngine.from_model(model, block_size=BLOCK, num_blocks=64)
    engine.add_request(
        prompt,
        SamplingParams(max_tokens=new, ignore_eos=True),
        press=RequestPress(press, max_cache_tokens=budget),
    )
    budget_blocks = -(-budget // BLOCK)
    outputs, peak_blocks = [], 0
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.finished]
        if engine.has_unfinished_requests():
            peak_blocks = max(peak_blocks, engine.get_stats().num_used_blocks)
    assert peak_blocks == budget_blocks  # between steps; a long prompt's blocks last only its prefill
    assert outputs[0].output_token_ids == expected
    assert engine.get_stats().num_press_evicted_tokens == prompt_len + new - 1 - budget
    engine.scheduler.kv.pool.check_invariants()


def test_a_ring_request_neither_publishes_nor_reuses_prefix_blocks(llama):
    prompt = prompt_of(24, seed=6)
    engine = LLMEngine.from_model(llama, block_size=BLOCK, num_blocks=64)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    press = RequestPress(get_press("streaming_llm", n_sink=2), max_cache_tokens=30)
    first = engine.add_request(prompt, params, press=press)
    second = engine.add_request(prompt, params)  # the same prompt, no press: must not hit the ring's blocks
    final = {}
    while engine.has_unfinished_requests():
        final |= {o.request_id: o.output_token_ids for o in engine.step() if o.finished}
    assert engine.get_stats().prefix_cache_hit_rate == 0.0
    assert final[second] == generate(llama.model, torch.tensor([prompt]), 12).tokens[0].tolist()
    assert len(final[first]) == 12


@pytest.mark.parametrize(
    "press, budget, match",
    [
        (get_press("h2o"), {"max_cache_tokens": 8}, "attention scores"),
        (get_press("tova"), {"max_cache_tokens": 8}, "attention scores"),
        (get_press("streaming_llm", n_sink=4), {"max_cache_tokens": 4}, "4 tokens is too small"),
        (get_press("pyramidkv", window=4), {"max_cache_tokens": 16}, "different budgets"),
        (get_press("knorm", rerotate=True), {"max_cache_tokens": 8}, "true positions"),
        (get_press("knorm", per_head=True), {"max_cache_tokens": 8}, "per kv-head"),
        (get_press("knorm"), {}, "exactly one"),
    ],
)
def test_unsupported_presses_are_refused_at_add_request(llama, press, budget, match):
    engine = LLMEngine.from_model(llama, block_size=BLOCK, num_blocks=16)
    with pytest.raises(ConfigError, match=match):
        engine.add_request(
            prompt_of(20, seed=4), SamplingParams(max_tokens=2), press=RequestPress(press, **budget)
        )
    assert not engine.has_unfinished_requests()


def test_llm_generate_applies_one_press_to_every_prompt(llama):
    from kvlab import LLM, RequestPress

    prompts = [prompt_of(30, seed=7), prompt_of(26, seed=8)]
    press = get_press("streaming_llm", n_sink=2)
    llm = LLM(llama, block_size=BLOCK, num_blocks=64)
    outputs = llm.generate(
        prompts,
        SamplingParams(max_tokens=NEW, ignore_eos=True),
        press=RequestPress(press, max_cache_tokens=12),
    )
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.output_token_ids == hf_press_greedy(llama, prompt, press, max_cache_tokens=12)
    assert llm.get_stats().num_press_evicted_tokens == sum(len(p) + NEW - 1 - 12 for p in prompts)


def test_a_request_press_must_be_a_press():
    with pytest.raises(ConfigError, match="press must be a Press"):
        RequestPress("knorm", compression_ratio=0.5)
