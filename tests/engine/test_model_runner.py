import random

import pytest
import torch

from kvlab.attention.backends.registry import get_backend
from kvlab.engine.config import EngineConfig
from kvlab.engine.model_runner import ModelRunner
from kvlab.engine.request import Request, SamplingParams
from kvlab.engine.scheduler import Scheduler

from .toy_model import HEAD_DIM, KV_HEADS, VOCAB, ToyModel


def run_engine(prompts, max_tokens, num_blocks=64, backend="reference", **config):
    model = ToyModel()
    config.setdefault("block_size", 4)
    scheduler = Scheduler(EngineConfig(**config), num_blocks)
    runner = ModelRunner(
        model,
        get_backend(backend),
        1,
        KV_HEADS,
        HEAD_DIM,
        num_blocks,
        config["block_size"],
        torch.float32,
        "cpu",
    )
    requests = [
        Request(str(i), p, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        for i, p in enumerate(prompts)
    ]
    for request in requests:
        scheduler.add_request(request)
    while scheduler.has_unfinished_requests():
        out = scheduler.schedule()
        scheduler.update(out, runner.execute(out))
    assert scheduler.kv.pool.num_free_blocks == num_blocks
    return model, scheduler, [r.output_token_ids for r in requests]


def prompts_of(lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("policy", ["strict", "time_share", "hybrid"])
def test_engine_greedy_equals_dense_greedy_for_a_mixed_batch(policy):
    prompts = prompts_of([1, 5, 17, 30])
    model, _, outputs = run_engine(prompts, 6, pd_policy=policy, max_num_batched_tokens=12)
    assert outputs == [model.dense_greedy(p, 6) for p in prompts]


@pytest.mark.parametrize("backend", ["sdpa", "tiled"])
def test_tiny_pool_preemption_gives_the_same_greedy_outputs(backend):
    prompts = prompts_of([6, 11, 14, 9], seed=1)
    model, roomy_scheduler, roomy = run_engine(prompts, 10, backend=backend)
    _, tiny_scheduler, tiny = run_engine(prompts, 10, num_blocks=7, backend=backend)
    assert roomy_scheduler.num_preemptions == 0 and tiny_scheduler.num_preemptions > 0
    assert tiny == roomy == [model.dense_greedy(p, 10) for p in prompts]


def test_prefix_cache_hits_skip_recomputation_and_keep_outputs():
    shared = prompts_of([16])[0]
    prompts = [shared + [1, 2, 3], shared + [4, 5]]
    model = ToyModel()
    scheduler = Scheduler(EngineConfig(block_size=4), 32)
    runner = ModelRunner(model, get_backend("reference"), 1, KV_HEADS, HEAD_DIM, 32, 4, torch.float32, "cpu")
    outputs, computed = [], []
    for i, prompt in enumerate(prompts):  # one after the other, so the second finds the first's blocks
        request = Request(str(i), prompt, SamplingParams(max_tokens=5, ignore_eos=True))
        scheduler.add_request(request)
        while scheduler.has_unfinished_requests():
            out = scheduler.schedule()
            computed.append((request.request_id, out.num_batched_tokens))
            scheduler.update(out, runner.execute(out))
        outputs.append(request.output_token_ids)
    assert outputs == [model.dense_greedy(p, 5) for p in prompts]
    first_prefill = [n for rid, n in computed if rid == "1"][0]
    assert first_prefill == 2  # 16 shared tokens came from the cache
    assert scheduler.kv.prefix_stats.num_hit_tokens == 16


def test_compaction_keeps_decoding_from_true_positions():
    """After keeping every token (a no-op press) in place, decoding continues unchanged."""
    prompt = prompts_of([13])[0]
    model = ToyModel()
    scheduler = Scheduler(EngineConfig(block_size=4, enable_prefix_caching=False), 16)
    runner = ModelRunner(model, get_backend("reference"), 1, KV_HEADS, HEAD_DIM, 16, 4, torch.float32, "cpu")
    request = Request("a", prompt, SamplingParams(max_tokens=6, ignore_eos=True))
    scheduler.add_request(request)
    out = scheduler.schedule()
    scheduler.update(out, runner.execute(out))
    old_blocks = list(scheduler.kv.block_ids("a"))
    keep_all = torch.arange(request.num_cached_tokens)[None, :]
    assert scheduler.kv.compact(request, keep_all, runner.kv_caches) == 0  # no block freed
    assert scheduler.kv.block_ids("a") == old_blocks
    while scheduler.has_unfinished_requests():
        out = scheduler.schedule()
        scheduler.update(out, runner.execute(out))
    assert request.output_token_ids == model.dense_greedy(prompt, 6)


def test_seeded_sampling_is_reproducible():
    def sample_once():
        model = ToyModel()
        scheduler = Scheduler(EngineConfig(block_size=4), 16)
        runner = ModelRunner(
            model, get_backend("reference"), 1, KV_HEADS, HEAD_DIM, 16, 4, torch.float32, "cpu"
        )
        request = Request(
            "a", [1, 2, 3], SamplingParams(temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
        )
        scheduler.add_request(request)
        while scheduler.has_unfinished_requests():
            out = scheduler.schedule()
            scheduler.update(out, runner.execute(out))
        return request.output_token_ids

    assert sample_once() == sample_once()
