"""Running one HTTP request's choices on the engine, and stopping them when nobody listens any more.

A request with n choices is n engine requests over the same prompt (`Job`), streamed as one sequence
of (choice index, output). Each choice runs in a task of its own: leaving the merged stream early
(client gone, error) cancels the tasks, and a cancelled `AsyncLLM.generate` aborts its engine request,
which frees its KV blocks at the next step boundary.
"""

import asyncio
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

from kvlab.engine.async_engine import AsyncLLM
from kvlab.engine.compression import RequestPress
from kvlab.engine.llm_engine import RequestOutput
from kvlab.engine.request import SamplingParams

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Job:
    """A validated request: its prompt's token ids and one SamplingParams per choice."""

    request_id: str
    prompt_ids: list[int]
    params: list[SamplingParams]
    press: RequestPress | None = None

    @property
    def engine_request_ids(self) -> list[str]:
        return [f"{self.request_id}-{index}" for index in range(len(self.params))]


async def run_choices(llm: AsyncLLM, job: Job) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Every choice's outputs as they come, tagged with the choice's index; ends once all finished."""
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException]] = asyncio.Queue()

    async def pump(index: int, params: SamplingParams, request_id: str) -> None:
        try:
            async for output in llm.generate(job.prompt_ids, params, request_id, job.press):
                queue.put_nowait((index, output))
        except Exception as error:  # EngineDeadError, a failed add: the merged stream raises it
            queue.put_nowait((index, error))

    tasks = [
        asyncio.create_task(pump(index, params, request_id))
        for index, (params, request_id) in enumerate(zip(job.params, job.engine_request_ids, strict=True))
    ]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            remaining -= item.finished
            yield index, item
    finally:
        for task in tasks:  # no await here: this may run inside a cancelled scope
            task.cancel()


async def collect(llm: AsyncLLM, job: Job, on_output) -> list[RequestOutput]:
    """Run every choice to its end; the final outputs in choice order. `on_output(index, output)` sees
    each output as it arrives (metrics)."""
    finals: list[RequestOutput | None] = [None] * len(job.params)
    async for index, output in run_choices(llm, job):
        on_output(index, output)
        if output.finished:
            finals[index] = output
    return finals


class ClientGone(Exception):
    """The client closed its connection before the response was ready."""


async def unless_disconnected(work: Awaitable[T], receive) -> T:
    """Await `work` while watching the connection: if the client leaves first, `work` is cancelled (an
    engine request aborts) and ClientGone is raised. `receive`: the ASGI receive of a request whose
    body was read, so the next message it gives is the disconnect."""

    async def until_disconnect() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(until_disconnect())
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch_task.cancel()
        if not work_task.done():
            work_task.cancel()
    if not work_task.done():
        await asyncio.wait({work_task})  # its cancellation runs the choices' cleanup (the aborts)
    if work_task.cancelled():
        raise ClientGone()
    return work_task.result()
