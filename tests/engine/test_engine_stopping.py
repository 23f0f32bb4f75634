"""The engine stops on every EOS id (issue 10, defect 5): `generation_config.eos_token_id` may be a
list, and LLMEngine / LLM / AsyncLLM take all of its ids by default."""

import copy
import dataclasses

import torch

from kvlab.engine.llm_engine import LLMEngine
from kvlab.engine.request import SamplingParams
from kvlab.llm import LLM

from .test_llm_engine import make_engine


def test_engine_stops_on_any_of_several_eos_ids():
    free = make_engine().generate(["hello"], SamplingParams(max_tokens=10))[0].output_token_ids
    unused = next(t for t in range(61) if t not in free)
    stop = free[4]
    engine = make_engine(eos_token_id=[unused, stop])
    (output,) = engine.generate(["hello"], SamplingParams(max_tokens=10))
    assert output.finish_reason == "stop"
    assert output.output_token_ids == free[: free.index(stop) + 1]
    (ignoring,) = engine.generate(["hello"], SamplingParams(max_tokens=10, ignore_eos=True))
    assert ignoring.output_token_ids == free and ignoring.finish_reason == "length"


def test_engines_default_to_every_eos_id_of_the_generation_config(tiny_model):
    prompt = torch.randint(10, 49000, (12,), generator=torch.Generator().manual_seed(7)).tolist()
    params = SamplingParams(max_tokens=10)
    free = LLMEngine.from_model(tiny_model, block_size=4, num_blocks=64).generate([prompt], params)[0]
    tokens = free.output_token_ids
    unused = next(t for t in range(3, 100) if t not in tokens)
    stop = tokens[5]
    # A copy: the fixture is shared by the session.
    loaded = dataclasses.replace(tiny_model, model=copy.deepcopy(tiny_model.model))
    loaded.model.generation_config.eos_token_id = [unused, stop]
    engine = LLMEngine.from_model(loaded, block_size=4, num_blocks=64)
    assert engine.eos_token_ids == (unused, stop)
    (output,) = LLM(loaded, block_size=4, num_blocks=64).generate([prompt], params)
    assert output.finish_reason == "stop" and output.output_token_ids == tokens[: tokens.index(stop) + 1]
