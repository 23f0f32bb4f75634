"""AsyncLLM: the engine behind an asyncio API. Each request is an async stream of its outputs.

    llm = AsyncLLM("tiny-llama", num_blocks=64)
    async for output in llm.generate("Hello", SamplingParams(max_tokens=8)):
        print(output.text)
    await llm.shutdown()

One background task drives the engine; each step runs in a worker thread so the event loop stays
responsive. The engine is touched by one party at a time: requests added or aborted from the event
loop are queued and applied between steps, never while a step runs. A queued operation that fails
fails its own request only (its stream raises the error); the driver keeps serving the others. The
tokenizer, which both threads use, is guarded by the engine's lock.
"""

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from kvlab.engine.compression import RequestPress
from kvlab.engine.config import EngineConfig
from kvlab.engine.llm_engine import EngineStats, LLMEngine, RequestOutput
from kvlab.engine.request import SamplingParams
from kvlab.models.loader import LoadedModel

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """A step failed; the requests in flight cannot continue."""


class AsyncLLM:
    def __init__(self, model: str | LoadedModel, config: EngineConfig | None = None, **overrides):
        self._attach(LLMEngine.from_model(model, config, **overrides))

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> "AsyncLLM":
        llm = cls.__new__(cls)
        llm._attach(engine)
        return llm

    def _attach(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._pending: list[tuple[str, Callable[[], None]]] = []  # (request id, operation)
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closed = False

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        press: RequestPress | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they are produced; the last one has `finished` set. Leaving the
        loop early (break, cancellation) aborts the request. `press`: see kvlab.engine.compression."""
        if self._closed:
            raise RuntimeError("AsyncLLM is shut down")
        task = self._task
        if task is not None and task.done() and task.get_loop() is asyncio.get_running_loop():
            raise EngineDeadError("the engine's driver task has ended: this AsyncLLM serves no more requests")
        # Validation errors (PromptTooLongError, an unsupported press) surface here, in the caller.
        request = self.engine.make_request(prompt, params, request_id, press)
        if request.request_id in self._queues:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[request.request_id] = queue
        self._submit(request.request_id, lambda: self.engine.scheduler.add_request(request))
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request.request_id, None)
            if not finished:
                self._submit(request.request_id, lambda: self.engine.abort(request.request_id))

    def abort(self, request_id: str) -> None:
        """End a request; its stream yields a final output with finish_reason "abort"."""
        self._submit(request_id, lambda: self._abort_now(request_id))

    @property
    def is_running(self) -> bool:
        """False once shut down, or once the driver task died (a bug): nothing will be served any more."""
        return not self._closed and not (self._task is not None and self._task.done())

    def get_stats(self) -> EngineStats:
        """Running/waiting counts, block usage, prefix-cache hit rate, preemptions, tokens/s."""
        return self.engine.get_stats()

    async def shutdown(self) -> None:
        """Stop the background task and abort whatever is still in flight."""
        self._closed = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        self._apply_pending()
        for request_id in list(self._queues):
            self._abort_now(request_id)

    def _submit(self, request_id: str, operation: Callable[[], None]) -> None:
        self._pending.append((request_id, operation))
        if not self._closed:
            self._start_driver()
        self._wake.set()

    def _start_driver(self) -> None:
        """Start the driver task in the running loop, unless one runs already. A driver left by an event
        loop that has since closed (e.g. an earlier asyncio.run) is replaced: its wake-up event is bound
        to that loop, so the new driver gets its own; the operations it left pending run first."""
        loop, task = asyncio.get_running_loop(), self._task
        if task is not None:
            if task.get_loop() is loop or not (task.done() or task.get_loop().is_closed()):
                return
            self._wake = asyncio.Event()
        self._task = loop.create_task(self._run())

    def _abort_now(self, request_id: str) -> None:
        output = self.engine.abort(request_id)
        queue = self._queues.get(request_id)
        if output is not None and queue is not None:
            queue.put_nowait(output)

    def _apply_pending(self) -> None:
        operations, self._pending = self._pending, []
        for request_id, operation in operations:
            try:
                operation()
            except Exception as error:  # the caller's request fails, the engine goes on
                queue = self._queues.get(request_id)
                if queue is not None:
                    queue.put_nowait(error)
                else:  # an abort from a stream that already left: nobody to tell but the log
                    logger.warning("operation on request %r failed: %r", request_id, error)

    async def _run(self) -> None:
        try:
            await self._drive()
        except BaseException as error:  # a bug in the driver itself: fail every stream, never hang
            for queue in list(self._queues.values()):
                queue.put_nowait(EngineDeadError(f"engine driver failed: {type(error).__name__}: {error}"))
            raise

    async def _drive(self) -> None:
        while not self._closed:
            self._apply_pending()
            if not self.engine.has_unfinished_requests():
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                outputs = await asyncio.to_thread(self.engine.step)
            except Exception as error:  # a failed step poisons every request in flight
                for request_id, queue in list(self._queues.items()):
                    self.engine.abort(request_id)
                    dead = EngineDeadError(f"engine step failed: {type(error).__name__}: {error}")
                    queue.put_nowait(dead)
                continue
            for output in outputs:
                queue = self._queues.get(output.request_id)
                if queue is not None:
                    queue.put_nowait(output)
