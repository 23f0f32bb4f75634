"""LLMEngine and AsyncLLM around the toy model (the real-model equivalence lives in test_engine_models.py)."""

import asyncio

import pytest
import torch

from kvlab.attention.backends.registry import get_backend
from kvlab.engine.async_engine import AsyncLLM
from kvlab.engine.config import EngineConfig
from kvlab.engine.llm_engine import LLMEngine
from kvlab.engine.model_runner import ModelRunner
from kvlab.engine.request import SamplingParams
from kvlab.engine.scheduler import Scheduler
from kvlab.errors import ConfigError, PromptTooLongError
from kvlab.llm import LLM

from .toy_model import HEAD_DIM, KV_HEADS, VOCAB, ToyModel


class CharTokenizer:
    def encode(self, text: str) -> list[int]:
        return [ord(c) % VOCAB for c in text]

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + t % 26) for t in token_ids)


def make_engine(num_blocks: int = 32, eos_token_id: int | None = None, **config) -> LLMEngine:
    config = EngineConfig(block_size=4, max_model_len=64, **config)
    runner = ModelRunner(
        ToyModel(), get_backend("reference"), 1, KV_HEADS, HEAD_DIM, num_blocks, 4, torch.float32, "cpu"
    )
    return LLMEngine(config, Scheduler(config, num_blocks), runner, CharTokenizer(), eos_token_id)


def test_generate_matches_dense_greedy_in_prompt_order():
    engine = make_engine()
    prompts = ["hello there", "a", "the quick brown fox"]
    outputs = engine.generate(prompts, SamplingParams(max_tokens=6))
    model = engine.runner.model
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.output_token_ids == model.dense_greedy(CharTokenizer().encode(prompt), 6)
        assert output.finish_reason == "length" and output.text == CharTokenizer().decode(
            output.output_token_ids
        )
    stats = engine.get_stats()
    assert stats.num_running == stats.num_waiting == stats.num_used_blocks == 0
    assert stats.generation_tokens_per_s > 0


def test_unknown_engine_option_raises_before_loading_anything():
    with pytest.raises(ConfigError, match="'blok_size'"):
        LLM("no-such-model", blok_size=4)


def test_prompt_too_long_and_context_cap():
    engine = make_engine()
    with pytest.raises(PromptTooLongError, match="context is 64"):
        engine.add_request("x" * 64)
    (output,) = engine.generate(["y" * 60], SamplingParams(max_tokens=50))
    assert len(output.output_token_ids) == 4 and output.finish_reason == "length"


def test_stop_string_and_eos_finish_with_stop():
    engine = make_engine()
    free = engine.generate(["hello"], SamplingParams(max_tokens=8))[0]
    stop = free.text[3:5]
    (stopped,) = make_engine().generate(["hello"], SamplingParams(max_tokens=8, stop=(stop,)))
    assert stopped.finish_reason == "stop" and stopped.text == free.text[: free.text.index(stop)]
    eos = free.output_token_ids[2]
    (by_eos,) = make_engine(eos_token_id=eos).generate(["hello"], SamplingParams(max_tokens=8))
    first_eos = free.output_token_ids.index(eos)
    assert (
        by_eos.finish_reason == "stop" and by_eos.output_token_ids == free.output_token_ids[: first_eos + 1]
    )


def test_a_stop_string_completed_by_the_last_allowed_token_finishes_with_stop():
    free = make_engine().generate(["hello"], SamplingParams(max_tokens=8))[0]
    stop = free.text[6:8]  # its last character comes with the 8th (last allowed) token
    (stopped,) = make_engine().generate(["hello"], SamplingParams(max_tokens=8, stop=(stop,)))
    assert stopped.text == free.text[: free.text.index(stop)] and stopped.finish_reason == "stop"


def test_an_empty_prompt_is_a_config_error_not_a_long_prompt():
    engine = make_engine()
    with pytest.raises(ConfigError, match="empty") as raised:
        engine.add_request([])
    assert not isinstance(raised.value, PromptTooLongError)


def test_generate_queues_nothing_when_any_prompt_is_refused():
    engine = make_engine()
    with pytest.raises(PromptTooLongError):
        engine.generate(["first", "second", "x" * 80], SamplingParams(max_tokens=4))
    with pytest.raises(ConfigError, match="2 prompts but 1 sampling params"):
        engine.generate(["first", "second"], [SamplingParams(max_tokens=4)])
    assert not engine.has_unfinished_requests()
    (output,) = engine.generate(["next"], SamplingParams(max_tokens=2))
    assert engine.get_stats().num_generated_tokens == len(output.output_token_ids) == 2


def test_unnamed_requests_get_ids_no_caller_has_taken():
    engine = make_engine()
    engine.add_request("mine", SamplingParams(max_tokens=4), request_id="req-1")
    ids = {engine.add_request(prompt, SamplingParams(max_tokens=4)) for prompt in ("one", "two", "three")}
    assert len(ids) == 3 and "req-1" not in ids


def test_abort_frees_blocks():
    engine = make_engine()
    request_id = engine.add_request("hello world", SamplingParams(max_tokens=20))
    engine.step()
    assert engine.get_stats().num_used_blocks > 0
    assert engine.abort(request_id).finish_reason == "abort"
    assert engine.abort(request_id) is None
    assert engine.get_stats().num_used_blocks == 0 and not engine.has_unfinished_requests()


def test_async_streams_abort_and_shutdown():
    async def main():
        llm = AsyncLLM.from_engine(make_engine(num_blocks=64))
        expected = make_engine().generate(["stream one", "stream two"], SamplingParams(max_tokens=5))

        async def collect(prompt, request_id, max_tokens=5):
            return [o async for o in llm.generate(prompt, SamplingParams(max_tokens=max_tokens), request_id)]

        async def abort_soon():
            await asyncio.sleep(0)
            llm.abort("long")

        first, second, long, _ = await asyncio.gather(
            collect("stream one", "a"),
            collect("stream two", "b"),
            collect("long one", "long", 40),
            abort_soon(),
        )
        for stream, final in ((first, expected[0]), (second, expected[1])):
            assert [len(o.output_token_ids) for o in stream] == [1, 2, 3, 4, 5]  # one output per token
            assert stream[-1].output_token_ids == final.output_token_ids and stream[-1].finished
        assert long[-1].finish_reason == "abort" and len(long[-1].output_token_ids) < 40
        # Leaving a stream early aborts its request.
        async for _ in llm.generate("early exit", SamplingParams(max_tokens=30), "early"):
            break
        await asyncio.sleep(0.05)
        stats = llm.get_stats()
        with pytest.raises(PromptTooLongError):
            await anext(llm.generate("z" * 80))
        await llm.shutdown()
        return stats

    stats = asyncio.run(main())
    assert stats.num_running == 0 and stats.num_waiting == 0 and stats.num_used_blocks == 0
