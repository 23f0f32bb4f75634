"""A press inside the engine under memory pressure: the output never depends on the pool's size.

- a ring (StreamingLLM) is compacted even when the pool has no free block, and a recompute after
  preemption never lets it run on an uncompacted cache (issue 10, defect 1);
- a budget the press cannot run is refused at add_request, before anything is committed (defect 2);
- after preemption the press keeps what it kept the first time (defect 3), for every press the
  engine runs; the others are refused at add_request (defect 6's "every press").
Every engine output is compared with `PressCache` on the HF path (the reference).
"""

import random

import pytest
import torch

from kvlab.engine.compression import RequestPress
from kvlab.engine.llm_engine import LLMEngine
from kvlab.engine.request import SamplingParams
from kvlab.errors import ConfigError
from kvlab.generate import generate
from kvlab.models.loader import load_model
from kvlab.press import get_press, list_presses
from kvlab.press.hf import PressCache

BLOCK = 4


def contextful(name: str):
    """A tiny model whose greedy output depends on the context: embeddings redrawn at std 1 and
    projections at std 0.5 (at the default init every prompt decodes one repeated token)."""
    loaded = load_model(name)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param_name, parameter in loaded.model.named_parameters():
            if parameter.dim() == 2:
                scale = 1.0 if "embed" in param_name else 0.5
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return loaded


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt-neox"])
def model(request):
    return contextful(request.param)


def prompt_of(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 49000) for _ in range(length)]


def press_reference(loaded, prompt: list[int], press, new: int, **budget) -> list[int]:
    cache = PressCache(press, loaded.model, **budget)
    with cache.hooks(loaded.model), torch.inference_mode():
        return generate(loaded.model, torch.tensor([prompt]), new, cache=cache).tokens[0].tolist()


def plain_reference(loaded, prompt: list[int], new: int) -> list[int]:
    return generate(loaded.model, torch.tensor([prompt]), new).tokens[0].tolist()


def test_a_ring_on_a_full_pool_is_compacted_and_a_one_token_recompute_keeps_it_a_ring(model):
    """12 blocks of 4: the plain request (20 tokens) and the ring's prompt (24) fill 11, so a copy of
    the ring's 13 kept tokens into fresh blocks found no room and the ring ran on the whole prompt.
    The plain request then grows and preempts the ring; with 27 tokens per step its recompute over
    prompt + outputs ended in a one-token chunk, scheduled as decode, so the press never ran again."""
    ring_prompt, plain_prompt = prompt_of(24, seed=11), prompt_of(20, seed=12)
    press = get_press("streaming_llm", n_sink=2)
    expected = press_reference(model, ring_prompt, press, 20, max_cache_tokens=13)
    assert expected != plain_reference(model, ring_prompt, 20)  # the eviction matters
    engine = LLMEngine.from_model(model, block_size=BLOCK, num_blocks=12, max_num_batched_tokens=27)
    plain = engine.add_request(plain_prompt, SamplingParams(max_tokens=24, ignore_eos=True))
    ring = engine.add_request(
        ring_prompt,
        SamplingParams(max_tokens=20, ignore_eos=True),
        press=RequestPress(press, max_cache_tokens=13),
    )
    ring_request = engine.scheduler.requests[ring]
    final = {}
    while engine.has_unfinished_requests():
        final |= {o.request_id: o.output_token_ids for o in engine.step() if o.finished}
        if ring_request.press_applied:  # once its prompt is pressed, the ring never holds more
            assert ring_request.num_cached_tokens <= 13
    assert ring_request.num_preemptions > 0
    assert final[ring] == expected
    assert final[plain] == plain_reference(model, plain_prompt, 24)
    engine.scheduler.kv.pool.check_invariants()


@pytest.mark.parametrize(
    "press, budget, message",
    [
        (
            get_press("snapkv", window=8),
            {"max_cache_tokens": 8},
            r"window=8.*budget of 8 tokens is too small.*9",
        ),
        (get_press("snapkv", window=8), {"compression_ratio": 0.5}, r"window=8.*budget of 6 tokens.*9"),
        (get_press("streaming_llm", n_sink=4), {"max_cache_tokens": 3}, r"n_sink=4.*3 tokens.*at least 5"),
    ],
)
def test_a_budget_below_the_press_minimum_is_refused_at_add_request(model, press, budget, message):
    """It was accepted and raised inside step(), after the scheduler had committed the step: the
    sync step's outputs were lost and every AsyncLLM stream got EngineDeadError."""
    first = prompt_of(10, seed=13)
    engine = LLMEngine.from_model(model, block_size=BLOCK, num_blocks=32)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    kept = engine.add_request(first, params)
    engine.step()  # the first request is under way
    with pytest.raises(ConfigError, match=message):
        engine.add_request(prompt_of(12, seed=14), params, press=RequestPress(press, **budget))
    final = {}
    while engine.has_unfinished_requests():
        final |= {o.request_id: o.output_token_ids for o in engine.step() if o.finished}
    assert list(final) == [kept] and final[kept] == plain_reference(model, first, 6)


PRESS_OPTIONS = {"snapkv": {"window": 4}, "pyramidkv": {"window": 4}, "random": {"seed": 3}}


@pytest.mark.parametrize("name", list_presses())
def test_tiny_pool_equals_roomy_pool_and_the_hf_press_for_every_press(model, name):
    """The pressed request is preempted after it generated tokens (a plain, older request grows into
    the pool). Its recompute used to re-run the press over prompt + outputs with the prompt's budget
    (prefill-time presses), or attend to the whole history (the ring): output depended on pressure."""
    press = get_press(name, **PRESS_OPTIONS.get(name, {}))
    spec = {"compression_ratio": 0.5}
    pressed_prompt, plain_prompt = prompt_of(24, seed=21), prompt_of(20, seed=22)
    pressed_params = SamplingParams(max_tokens=20, ignore_eos=True)
    plain_params = SamplingParams(max_tokens=24, ignore_eos=True)

    def run(num_blocks: int):
        engine = LLMEngine.from_model(model, block_size=BLOCK, num_blocks=num_blocks)
        plain = engine.add_request(plain_prompt, plain_params)
        pressed = engine.add_request(pressed_prompt, pressed_params, press=RequestPress(press, **spec))
        request = engine.scheduler.requests[pressed]
        final, outputs_at_preemption = {}, []
        while engine.has_unfinished_requests():
            before = request.num_preemptions
            outputs = len(request.output_token_ids)
            final |= {o.request_id: o.output_token_ids for o in engine.step() if o.finished}
            if request.num_preemptions > before:
                outputs_at_preemption.append(outputs)
        engine.scheduler.kv.pool.check_invariants()
        return final[pressed], final[plain], outputs_at_preemption

    try:
        RequestPress(press, **spec).budget(len(pressed_prompt), model.model.config.num_hidden_layers)
    except ConfigError:
        engine = LLMEngine.from_model(model, block_size=BLOCK, num_blocks=12)
        with pytest.raises(ConfigError):
            engine.add_request(pressed_prompt, pressed_params, press=RequestPress(press, **spec))
        assert not engine.has_unfinished_requests()
        assert name in ("h2o", "tova", "pyramidkv")  # the presses the engine does not run
        return
    roomy, roomy_plain, none = run(64)
    tiny, tiny_plain, preempted_after = run(12)
    assert none == [] and preempted_after and max(preempted_after) > 0  # preempted mid-decode
    expected = press_reference(model, pressed_prompt, press, 20, **spec)
    assert tiny == roomy == expected
    assert tiny_plain == roomy_plain == plain_reference(model, plain_prompt, 24)


def test_async_streams_survive_a_press_budget_below_its_minimum(model):
    """The bad request fails in its caller; the stream already running completes with plain greedy."""
    import asyncio

    from kvlab.engine.async_engine import AsyncLLM

    first = prompt_of(10, seed=15)
    params = SamplingParams(max_tokens=6, ignore_eos=True)

    async def main():
        llm = AsyncLLM.from_engine(LLMEngine.from_model(model, block_size=BLOCK, num_blocks=32))

        async def collect(prompt, press=None):
            return [o async for o in llm.generate(prompt, params, press=press)]

        running = asyncio.ensure_future(collect(first))
        await asyncio.sleep(0)  # the first request is submitted
        bad = RequestPress(get_press("snapkv", window=8), max_cache_tokens=8)
        with pytest.raises(ConfigError, match="too small"):
            await collect(prompt_of(12, seed=16), press=bad)
        outputs = await asyncio.wait_for(running, 120)
        await llm.shutdown()
        return outputs

    outputs = asyncio.run(main())
    assert outputs[-1].finished and outputs[-1].output_token_ids == plain_reference(model, first, 6)


def test_a_ring_preempted_while_filling_its_budget_replays_exactly(model):
    """Budget 30 over a 24-token prompt: decode appends up to 30, then the ring starts. The replay
    after preemption appends the outputs that fit the budget in one chunk, then one per step."""
    ring_prompt, plain_prompt = prompt_of(24, seed=31), prompt_of(20, seed=32)
    press = get_press("streaming_llm", n_sink=2)
    expected = press_reference(model, ring_prompt, press, 20, max_cache_tokens=30)
    assert expected != plain_reference(model, ring_prompt, 20)
    engine = LLMEngine.from_model(model, block_size=BLOCK, num_blocks=15)
    plain = engine.add_request(plain_prompt, SamplingParams(max_tokens=24, ignore_eos=True))
    ring = engine.add_request(
        ring_prompt,
        SamplingParams(max_tokens=20, ignore_eos=True),
        press=RequestPress(press, max_cache_tokens=30),
    )
    request, final, chunks = engine.scheduler.requests[ring], {}, []
    while engine.has_unfinished_requests():
        scheduled = engine.scheduler.schedule()
        chunks += [s.num_new_tokens for s in scheduled.scheduled if s.request is request]
        sampled = engine.runner.execute(scheduled)
        done = engine.scheduler.update(scheduled, sampled)
        engine._run_presses(scheduled)
        final |= {r.request_id: r.output_token_ids for r in done}
    assert request.num_preemptions > 0 and 6 in chunks  # 24 recomputed, then 6 outputs up to 30
    assert final[ring] == expected
    assert final[plain] == plain_reference(model, plain_prompt, 24)
