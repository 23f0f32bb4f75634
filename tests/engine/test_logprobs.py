"""Logprobs from the engine: each sampled token's log-probability (and the top-k alternatives') is the
log-softmax of the model's logits at its position, as a dense Hugging Face forward computes them; they
survive preemption; a request that does not ask gets none (and pays nothing)."""

import pytest
import torch

from kvlab.engine.llm_engine import LLMEngine
from kvlab.engine.request import MAX_LOGPROBS, SamplingParams
from kvlab.errors import ConfigError

from .test_engine_models import prompts_of


def dense_logprobs(loaded, prompt: list[int], output: list[int]) -> torch.Tensor:
    """(len(output), vocab): log-softmax of the logits that predicted each output token."""
    ids = torch.tensor([prompt + output])
    with torch.no_grad():
        logits = loaded.model(ids).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : len(prompt) + len(output) - 1]


@pytest.mark.parametrize("num_top", [0, 3])
def test_logprobs_are_the_dense_models_log_softmax(tiny_model, num_top):
    engine = LLMEngine.from_model(tiny_model, block_size=4, num_blocks=64)
    prompts = prompts_of([5, 19])
    outputs = engine.generate(prompts, SamplingParams(max_tokens=6, logprobs=num_top, ignore_eos=True))
    for prompt, output in zip(prompts, outputs, strict=True):
        assert len(output.logprobs) == len(output.output_token_ids) == 6
        reference = dense_logprobs(tiny_model, prompt, output.output_token_ids)
        for position, (token_id, entry) in enumerate(
            zip(output.output_token_ids, output.logprobs, strict=True)
        ):
            assert entry.token_id == token_id
            assert entry.logprob == pytest.approx(reference[position, token_id].item(), abs=1e-3)
            assert len(entry.top) == num_top
            if num_top:
                values, ids = reference[position].topk(num_top)
                assert [i for i, _ in entry.top] == ids.tolist()
                assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=1e-3)
                assert entry.top[0][0] == token_id  # greedy picks the most likely token


def test_logprobs_survive_preemption(tiny_model):
    prompts = prompts_of([12, 14, 9, 15])
    params = SamplingParams(max_tokens=8, logprobs=1, ignore_eos=True)
    roomy = LLMEngine.from_model(tiny_model, block_size=4, num_blocks=64).generate(prompts, params)
    tight_engine = LLMEngine.from_model(tiny_model, block_size=4, num_blocks=12)
    tight = tight_engine.generate(prompts, params)
    assert tight_engine.get_stats().num_preemptions > 0
    for a, b in zip(roomy, tight, strict=True):
        assert [e.token_id for e in b.logprobs] == b.output_token_ids == a.output_token_ids
        assert [e.logprob for e in b.logprobs] == pytest.approx([e.logprob for e in a.logprobs], abs=1e-3)


def test_streamed_outputs_carry_this_steps_logprobs(tiny_model):
    engine = LLMEngine.from_model(tiny_model, block_size=4, num_blocks=64)
    engine.add_request(prompts_of([7])[0], SamplingParams(max_tokens=4, logprobs=0, ignore_eos=True))
    seen = []
    while engine.has_unfinished_requests():
        for output in engine.step():
            assert len(output.logprobs) == len(output.output_token_ids)
            seen.extend(output.logprobs[len(output.logprobs) - len(output.new_token_ids) :])
    assert [e.token_id for e in seen] == output.output_token_ids


def test_no_logprobs_unless_asked(tiny_model):
    engine = LLMEngine.from_model(tiny_model, block_size=4, num_blocks=64)
    (output,) = engine.generate(prompts_of([6]), SamplingParams(max_tokens=3))
    assert output.logprobs is None
    assert engine.runner.step_logprobs == {}


@pytest.mark.parametrize("bad", [-1, MAX_LOGPROBS + 1, 1.5, True])
def test_bad_logprobs_counts_are_config_errors(bad):
    with pytest.raises(ConfigError, match="logprobs"):
        SamplingParams(logprobs=bad)
