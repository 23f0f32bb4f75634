"""On a CUDA device: the engine (Triton paged attention, and SDPA) and `kvlab.generate` decode
exactly what Hugging Face `generate` decodes there. Skipped where no GPU is present (CI); run on a
GPU machine with `pytest tests/engine/test_engine_cuda.py`."""

import copy
import dataclasses

import pytest
import torch

from kvlab.engine.llm_engine import LLMEngine
from kvlab.engine.request import SamplingParams
from kvlab.generate import generate

from .test_engine_models import MAX_TOKENS, prompts_of

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def cuda_model(tiny_model):
    model = copy.deepcopy(tiny_model.model).to("cuda")
    return dataclasses.replace(tiny_model, model=model)


def hf_greedy_cuda(loaded, prompt: list[int], max_tokens: int = MAX_TOKENS) -> list[int]:
    ids = torch.tensor([prompt], device="cuda")
    with torch.no_grad():
        out = loaded.model.generate(
            ids, max_new_tokens=max_tokens, do_sample=False, attention_mask=torch.ones_like(ids)
        )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_engine_on_cuda_matches_hf_greedy(cuda_model, backend):
    prompts = prompts_of([3, 17, 40, 9, 70])
    reference = [hf_greedy_cuda(cuda_model, p) for p in prompts]
    engine = LLMEngine.from_model(
        cuda_model,
        device="cuda",
        attention_backend=backend,
        block_size=16,
        num_blocks=64,
        max_num_batched_tokens=32,  # chunked prefill: the 40- and 70-token prompts span steps
    )
    outputs = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS))
    assert [o.output_token_ids for o in outputs] == reference


def test_engine_on_cuda_preempts_and_matches_a_roomy_pool(cuda_model):
    prompts = prompts_of([30, 31, 29, 33])
    reference = [hf_greedy_cuda(cuda_model, p) for p in prompts]
    engine = LLMEngine.from_model(
        cuda_model, device="cuda", attention_backend="triton", block_size=16, num_blocks=6
    )
    outputs = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS))
    assert engine.get_stats().num_preemptions > 0
    assert [o.output_token_ids for o in outputs] == reference


@pytest.mark.parametrize("path", ["native", "hf"])
def test_generate_on_cuda_matches_hf_greedy(cuda_model, path):
    prompt = prompts_of([24])[0]
    result = generate(cuda_model.model, torch.tensor([prompt], device="cuda"), MAX_TOKENS, path=path)
    assert result.tokens[0].tolist() == hf_greedy_cuda(cuda_model, prompt)
