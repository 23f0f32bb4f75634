"""AsyncLLM under faults (issue 10, defect 6): a queued add or abort that raises fails its own caller
while the engine serves the others; the tokenizer is never used from two threads at once; a
preempted request's recorded queries do not survive a step that runs nothing."""

import asyncio
import threading
import time

from kvlab.engine.async_engine import AsyncLLM
from kvlab.engine.compression import RequestPress
from kvlab.engine.request import SamplingParams
from kvlab.engine.scheduler import SchedulerOutput
from kvlab.press import get_press

from .test_llm_engine import CharTokenizer, make_engine

TIMEOUT_S = 60  # a hung stream fails the test instead of hanging the suite


def collect(llm, prompt, request_id, max_tokens=5):
    async def run():
        return [o async for o in llm.generate(prompt, SamplingParams(max_tokens=max_tokens), request_id)]

    return run()


def test_a_failing_queued_add_fails_only_its_caller():
    class Refused(RuntimeError):
        pass

    async def main():
        engine = make_engine(num_blocks=64)
        add = engine.scheduler.add_request

        def add_or_refuse(request):
            if request.request_id == "bad":
                raise Refused("no room for you")
            add(request)

        engine.scheduler.add_request = add_or_refuse
        llm = AsyncLLM.from_engine(engine)
        results = await asyncio.wait_for(
            asyncio.gather(
                collect(llm, "one", "a"),
                collect(llm, "two", "bad"),
                collect(llm, "three", "b"),
                return_exceptions=True,
            ),
            TIMEOUT_S,
        )
        # The engine goes on serving: a later request completes too.
        later = await asyncio.wait_for(collect(llm, "four", "c"), TIMEOUT_S)
        await llm.shutdown()
        return results, later

    (first, bad, third), later = asyncio.run(main())
    assert isinstance(bad, Refused)
    expected = make_engine().generate(["one", "three", "four"], SamplingParams(max_tokens=5))
    for stream, final in zip((first, third, later), expected, strict=True):
        assert stream[-1].finished and stream[-1].output_token_ids == final.output_token_ids


def test_a_failing_queued_abort_does_not_stop_the_engine():
    async def main():
        engine = make_engine(num_blocks=64)
        abort = engine.abort

        def failing_abort(request_id):
            if request_id == "victim":
                raise RuntimeError("abort failed")
            return abort(request_id)

        engine.abort = failing_abort
        llm = AsyncLLM.from_engine(engine)
        async for _ in llm.generate("leave early", SamplingParams(max_tokens=30), "victim"):
            break  # queues an abort, which raises; nobody is left to tell
        llm.abort("victim")  # a public abort that raises: the error goes to no live stream either
        result = await asyncio.wait_for(collect(llm, "still served", "next"), TIMEOUT_S)
        await llm.shutdown()
        return result

    stream = asyncio.run(main())
    assert stream[-1].finished and len(stream[-1].output_token_ids) == 5


class GuardedTokenizer(CharTokenizer):
    """Records calls that overlap another call from a different thread (HF fast tokenizers are not
    thread-safe); each call takes a moment so that an overlap is likely when nothing prevents it."""

    def __init__(self):
        self.guard = threading.Lock()
        self.active = 0
        self.overlaps = 0
        self.threads: set[int] = set()

    def _call(self, fn, *args):
        with self.guard:
            self.active += 1
            self.overlaps += self.active > 1
            self.threads.add(threading.get_ident())
        time.sleep(0.003)
        try:
            return fn(*args)
        finally:
            with self.guard:
                self.active -= 1

    def encode(self, text):
        return self._call(super().encode, text)

    def decode(self, token_ids, skip_special_tokens=True):
        return self._call(super().decode, token_ids)


def test_tokenizer_is_never_used_by_two_threads_at_once():
    tokenizer = GuardedTokenizer()

    async def main():
        engine = make_engine(num_blocks=64)
        engine.tokenizer = tokenizer
        llm = AsyncLLM.from_engine(engine)

        async def later(i):
            await asyncio.sleep(0.004 * i)  # new prompts arrive (and are tokenised) while steps run
            return await collect(llm, f"prompt {i}", f"r{i}", 12)

        streams = await asyncio.wait_for(asyncio.gather(*(later(i) for i in range(12))), TIMEOUT_S)
        await llm.shutdown()
        return streams

    streams = asyncio.run(main())
    assert all(s[-1].finished for s in streams)
    assert len(tokenizer.threads) >= 2  # the loop and a worker both used it: the check is not vacuous
    assert tokenizer.overlaps == 0


def test_preempted_request_queries_are_dropped_even_when_the_step_runs_nothing():
    prompt = list(range(1, 21))
    press = RequestPress(get_press("snapkv", window=4), max_cache_tokens=8)
    params = SamplingParams(max_tokens=4)
    expected = make_engine(max_num_batched_tokens=8).generate([prompt], params, press=press)[0]

    engine = make_engine(max_num_batched_tokens=8)  # the 20-token prompt prefills in chunks of 8
    request_id = engine.add_request(prompt, params, press=press)
    engine.step()
    assert len(engine.runner.recorded_queries[request_id][0]) == 1  # the first chunk's queries
    scheduler, schedule = engine.scheduler, engine.scheduler.schedule

    def preempt_and_run_nothing():
        # As when the pool runs dry: the request gives its blocks back and nothing else can run.
        scheduler._preempt(scheduler.requests[request_id])
        scheduler.schedule = schedule
        return SchedulerOutput(preempted_request_ids=[request_id])

    scheduler.schedule = preempt_and_run_nothing
    assert engine.step() == []
    assert request_id not in engine.runner.recorded_queries
    final = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            final = output
    assert final.output_token_ids == expected.output_token_ids


def test_an_async_llm_serves_a_second_event_loop_after_the_first_closed():
    # asyncio.run cancels the driver task when its loop ends; the next loop gets a driver of its own
    # (the old one's wake-up event is bound to the closed loop), where the stream used to wait forever.
    llm = AsyncLLM.from_engine(make_engine(num_blocks=64))
    expected = make_engine().generate(["first loop", "second loop"], SamplingParams(max_tokens=4))
    for prompt, request_id, reference in zip(["first loop", "second loop"], "ab", expected, strict=True):
        stream = asyncio.run(asyncio.wait_for(collect(llm, prompt, request_id, max_tokens=4), TIMEOUT_S))
        assert stream[-1].output_token_ids == reference.output_token_ids


def test_a_driver_that_died_in_this_loop_refuses_new_requests():
    from kvlab.engine.async_engine import EngineDeadError

    async def main():
        llm = AsyncLLM.from_engine(make_engine(num_blocks=64))
        await collect(llm, "warm", "a", max_tokens=2)
        llm._task.cancel()  # what a bug in the driver leaves: a finished task in this loop
        await asyncio.sleep(0)
        try:
            await collect(llm, "after", "b", max_tokens=2)
        except EngineDeadError:
            return True
        return False

    assert asyncio.run(asyncio.wait_for(main(), TIMEOUT_S))
