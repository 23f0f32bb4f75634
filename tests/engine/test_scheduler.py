import random
from collections import Counter

import pytest

from kvlab.engine.config import EngineConfig
from kvlab.engine.request import Request, RequestStatus, SamplingParams
from kvlab.engine.scheduler import Scheduler, SchedulerOutput
from kvlab.errors import PromptTooLongError

POLICIES = ["strict", "time_share", "hybrid"]


def fake_token(request: Request) -> int:
    """A deterministic 'model': the next token is a function of all tokens so far, as greedy decoding is."""
    return (sum(request.all_token_ids) * 31 + request.num_tokens) % 97 + 3


def step(scheduler: Scheduler) -> SchedulerOutput:
    out = scheduler.schedule()
    scheduler.update(out, {s.request.request_id: fake_token(s.request) for s in out.scheduled if s.samples})
    return out


def make_scheduler(num_blocks=64, **config) -> Scheduler:
    config.setdefault("block_size", 4)
    return Scheduler(EngineConfig(**config), num_blocks)


def add(
    scheduler: Scheduler, request_id: str, num_prompt: int, max_tokens: int = 4, offset: int = 0
) -> Request:
    request = Request(
        request_id,
        [offset + i % 50 + 3 for i in range(num_prompt)],
        SamplingParams(max_tokens=max_tokens, ignore_eos=True),
    )
    scheduler.add_request(request)
    return request


def run_all(scheduler: Scheduler, max_steps: int = 500) -> list[SchedulerOutput]:
    outputs = []
    while scheduler.has_unfinished_requests():
        outputs.append(step(scheduler))
        assert len(outputs) < max_steps, "scheduler made no progress"
    return outputs


def kinds(out: SchedulerOutput) -> set[str]:
    return {"prefill" if s.is_prefill else "decode" for s in out.scheduled}


def test_hybrid_serves_decodes_first_then_chunks_prefill_into_the_rest():
    scheduler = make_scheduler(max_num_batched_tokens=8, pd_policy="hybrid")
    add(scheduler, "a", 5)
    assert [(s.request.request_id, s.num_new_tokens) for s in step(scheduler).scheduled] == [("a", 5)]
    add(scheduler, "b", 20)
    out = step(scheduler)
    assert [(s.request.request_id, s.num_new_tokens, s.is_prefill) for s in out.scheduled] == [
        ("a", 1, False),
        ("b", 7, True),
    ]
    assert not out.scheduled[1].samples  # a partial chunk samples nothing
    out = step(scheduler)
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 7)]


def test_strict_prefills_first_and_never_mixes():
    scheduler = make_scheduler(max_num_batched_tokens=8, pd_policy="strict")
    add(scheduler, "a", 5)
    step(scheduler)
    add(scheduler, "b", 12, offset=50)  # no shared prefix: two chunks of prefill
    outs = run_all(scheduler)
    assert all(len(kinds(out)) == 1 for out in outs)
    assert [kinds(out) for out in outs[:2]] == [{"prefill"}, {"prefill"}]  # b's two chunks before a's decode


def test_time_share_alternates_while_both_kinds_are_pending():
    scheduler = make_scheduler(max_num_batched_tokens=4, pd_policy="time_share")
    add(scheduler, "a", 3, max_tokens=10)
    step(scheduler)
    add(scheduler, "b", 12, offset=50)
    outs = [step(scheduler) for _ in range(6)]
    assert [kinds(out) for out in outs] == [{"decode"}, {"prefill"}] * 3


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("chunked", [True, False])
def test_token_budget_and_max_num_seqs_are_respected(policy, chunked):
    rng = random.Random(0)
    scheduler = make_scheduler(
        max_num_batched_tokens=40, max_num_seqs=3, pd_policy=policy, enable_chunked_prefill=chunked
    )
    requests = [add(scheduler, str(i), rng.randint(1, 40), rng.randint(1, 6)) for i in range(10)]
    for out in run_all(scheduler):
        assert 0 < out.num_batched_tokens <= 40 and len(out.scheduled) <= 3
        if not chunked:
            assert all(s.samples for s in out.scheduled)  # whole prompts only
    assert all(r.status is RequestStatus.FINISHED_LENGTH for r in requests)
    assert scheduler.kv.pool.num_free_blocks == 64


@pytest.mark.parametrize("policy", POLICIES)
def test_tiny_pool_preempts_and_gives_the_same_tokens_as_a_roomy_one(policy):
    def outputs(num_blocks):
        scheduler = make_scheduler(num_blocks=num_blocks, pd_policy=policy)
        requests = [add(scheduler, str(i), 6 + i, max_tokens=10, offset=i) for i in range(4)]
        run_all(scheduler)
        assert scheduler.kv.pool.num_free_blocks == num_blocks
        return [r.output_token_ids for r in requests], scheduler.num_preemptions

    roomy, no_preemptions = outputs(64)
    tiny, preemptions = outputs(6)  # each request needs 4-5 blocks by its end
    assert no_preemptions == 0 and preemptions > 0
    assert tiny == roomy


def test_newest_running_request_is_preempted():
    scheduler = make_scheduler(num_blocks=4, max_num_batched_tokens=64)
    first = add(scheduler, "first", 4, max_tokens=8)
    second = add(scheduler, "second", 4, max_tokens=8)
    step(scheduler)  # both prefilled: 1 block each
    out = step(scheduler)  # each needs a 2nd block: 4 blocks, fits
    out = step(scheduler)
    while not out.preempted_request_ids:
        out = step(scheduler)
    assert out.preempted_request_ids == ["second"] and second.status is RequestStatus.PREEMPTED
    assert first.status is RequestStatus.RUNNING and scheduler.waiting[0] is second


def test_prefix_cache_hit_skips_recomputation():
    scheduler = make_scheduler(max_num_batched_tokens=64)
    add(scheduler, "a", 18)
    run_all(scheduler)
    late = add(scheduler, "b", 18)
    out = step(scheduler)
    assert out.scheduled[0].start == 16 and out.scheduled[0].num_new_tokens == 2
    assert late.num_computed_tokens == 18
    assert scheduler.kv.prefix_stats.num_hit_tokens == 16


def test_stop_conditions():
    scheduler = make_scheduler()
    probe = Request("probe", [5, 6, 7])
    eos = fake_token(probe)
    stopped = Request("eos", [5, 6, 7], SamplingParams(max_tokens=5), eos_token_ids=(eos,))
    ignoring = Request(
        "ignore", [5, 6, 7], SamplingParams(max_tokens=5, ignore_eos=True), eos_token_ids=(eos,)
    )
    by_id = Request("stop-id", [5, 6, 7], SamplingParams(max_tokens=5, stop_token_ids=(eos,)))
    for request in (stopped, ignoring, by_id):
        scheduler.add_request(request)
    run_all(scheduler)
    assert stopped.status is RequestStatus.FINISHED_STOPPED and stopped.output_token_ids == [eos]
    assert by_id.status is RequestStatus.FINISHED_STOPPED
    assert ignoring.status is RequestStatus.FINISHED_LENGTH and len(ignoring.output_token_ids) == 5


def test_request_that_can_never_fit_is_rejected():
    scheduler = make_scheduler(num_blocks=2)
    with pytest.raises(PromptTooLongError, match="KV pool"):
        add(scheduler, "big", 8, max_tokens=4)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("seed", range(3))
def test_random_add_abort_preempt_keeps_block_invariants(policy, seed):
    rng = random.Random(seed)
    scheduler = make_scheduler(
        num_blocks=12, max_num_batched_tokens=rng.choice([8, 16, 32]), pd_policy=policy
    )
    live: list[Request] = []
    for i in range(120):
        action = rng.random()
        if action < 0.25:
            # Shared prefixes exercise the prefix cache; requests fit the pool alone (<= 12 blocks).
            prefix = [7] * rng.choice([0, 4, 8])
            request = Request(
                str(i),
                prefix + [rng.randint(3, 90) for _ in range(rng.randint(1, 20))],
                SamplingParams(max_tokens=rng.randint(1, 12), ignore_eos=True),
            )
            scheduler.add_request(request)
            live.append(request)
        elif action < 0.35 and live:
            scheduler.finish_requests([rng.choice(live).request_id], RequestStatus.FINISHED_ABORTED)
        else:
            out = step(scheduler)
            assert out.num_batched_tokens <= scheduler.config.max_num_batched_tokens
        live = [r for r in live if not r.is_finished]
        pool = scheduler.kv.pool
        pool.check_invariants()
        assert pool.num_free_blocks + pool.num_used_blocks == pool.num_blocks
        # Every reference is held by exactly one live request's block table.
        holders = Counter(b for r in scheduler.running for b in scheduler.kv.block_ids(r.request_id))
        assert {b.block_id: b.ref_count for b in pool.blocks if b.ref_count} == dict(holders)
        assert all(not scheduler.kv.block_ids(r.request_id) for r in scheduler.waiting)
    run_all(scheduler)
    assert scheduler.kv.pool.num_free_blocks == 12 and not scheduler.kv.req_to_block_ids
