"""The two generation endpoints: body -> validated `Job` -> engine -> OpenAI object or SSE stream.

Everything a client can get wrong is checked before any engine request exists, so a refusal is a
clean 4xx: the body (size, JSON, fields), the model name, the prompt (length against the context, token
ids against the vocabulary, the press's budget), max_tokens against the room left, and only then
admission (429 / 503). A client that disconnects while its request runs aborts it (see generation.py).
"""

import logging
from contextlib import aclosing
from dataclasses import replace

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kvlab.engine.async_engine import AsyncLLM, EngineDeadError
from kvlab.engine.compression import RequestPress
from kvlab.engine.request import SamplingParams
from kvlab.errors import ConfigError, PromptTooLongError
from kvlab.server.admission import Admission
from kvlab.server.errors import ApiError, bad_request, error_body
from kvlab.server.generation import ClientGone, Job, collect, run_choices, unless_disconnected
from kvlab.server.metrics import ServerMetrics
from kvlab.server.protocol import ChatCompletionRequest, CompletionRequest, parse_body
from kvlab.server.responses import ChunkWriter, Envelope, response_object, sse

logger = logging.getLogger(__name__)

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the room left
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left first; only our metrics ever see it


class EventStream(StreamingResponse):
    """An SSE response that always closes its event generator and then runs `on_close`: a client that
    disconnects between two events runs the generator's cleanup (abort) now, not at garbage
    collection, and a stream that never started still hands back what it held (`on_close`)."""

    media_type = "text/event-stream"

    def __init__(self, content, on_close, headers: dict[str, str]):
        super().__init__(content, headers=headers)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                self.on_close()


class Generation:
    """The state both endpoints share: the engine, the served name, the press and the bookkeeping."""

    def __init__(
        self,
        llm: AsyncLLM,
        model_name: str,
        admission: Admission,
        metrics: ServerMetrics,
        max_body_bytes: int,
        press: RequestPress | None = None,
    ):
        self.llm = llm
        self.model_name = model_name
        self.admission = admission
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.press = press

    async def completions(self, request: Request) -> Response:
        self.admission.check_open()
        body = parse_body(await self._read_body(request), CompletionRequest)
        self._check_model(body.model)
        engine = self.llm.engine
        prompt_ids = engine.tokenize(body.prompt) if isinstance(body.prompt, str) else body.prompt
        envelope = Envelope.new("text_completion", self.model_name)
        job = self._job(
            envelope.id, prompt_ids, body, body.max_tokens, body.logprobs, COMPLETION_DEFAULT_MAX_TOKENS
        )
        return await self._respond(request, job, envelope, body)

    async def chat(self, request: Request) -> Response:
        self.admission.check_open()
        body = parse_body(await self._read_body(request), ChatCompletionRequest)
        self._check_model(body.model)
        prompt = self._render_chat([m.as_template_input() for m in body.messages])
        prompt_ids = self.llm.engine.tokenize(prompt, add_special_tokens=False)  # the template wrote them
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        envelope = Envelope.new("chat.completion", self.model_name)
        job = self._job(envelope.id, prompt_ids, body, max_tokens, body.num_logprobs, None)
        return await self._respond(request, job, envelope, body)

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with 413 past max_body_bytes: by its Content-Length before reading, or
        while reading a chunked body."""
        too_large = ApiError(
            413, f"request body exceeds {self.max_body_bytes} bytes", code="request_too_large"
        )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise ApiError(
                404,
                f"The model '{model}' does not exist; this server serves '{self.model_name}'",
                param="model",
                code="model_not_found",
            )

    def _render_chat(self, messages: list[dict[str, str]]) -> str:
        tokenizer = self.llm.engine.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise bad_request("this model has no chat template; use /v1/completions", "messages")
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as error:  # the template is code that may refuse the conversation (roles, order)
            raise bad_request(
                f"the model's chat template refused the messages: {error}", "messages"
            ) from None

    def _job(self, request_id, prompt_ids, body, max_tokens, logprobs, default_max_tokens) -> Job:
        """The engine requests of a validated body; raises ApiError(400) for a prompt or max_tokens that
        cannot run. `default_max_tokens` None: all the room the context (and the KV pool) leaves."""
        self.admission.check_size(body.n)
        engine = self.llm.engine
        context = engine.config.max_model_len
        if len(prompt_ids) >= context:
            raise ApiError(
                400,
                f"This model's maximum context length is {context} tokens and the prompt has {len(prompt_ids)}; "
                "at least one token must be left to generate",
                param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                code="context_length_exceeded",
            )
        room = context - len(prompt_ids)
        if max_tokens is None:
            pool_tokens = self.llm.get_stats().num_blocks * engine.config.block_size
            max_tokens = min(default_max_tokens or room, room, max(1, pool_tokens - len(prompt_ids)))
        elif max_tokens > room:
            raise ApiError(
                400,
                f"This model's maximum context length is {context} tokens; the prompt has {len(prompt_ids)} "
                f"and max_tokens asks for {max_tokens} more",
                param="max_completion_tokens"
                if getattr(body, "max_completion_tokens", None)
                else "max_tokens",
                code="context_length_exceeded",
            )
        try:
            params = SamplingParams(
                temperature=body.temperature,
                top_k=body.top_k,
                top_p=body.top_p,
                seed=body.seed,
                max_tokens=max_tokens,
                stop=body.stop,
                ignore_eos=body.ignore_eos,
                logprobs=logprobs,
            )
            # The engine's own checks (token ids, the KV pool, the press's budget), without adding anything.
            engine.make_request(prompt_ids, params, press=self.press)
        except PromptTooLongError as error:
            raise ApiError(400, str(error), param="prompt", code="context_length_exceeded") from None
        except (ConfigError, ValueError) as error:
            raise bad_request(str(error)) from None
        # Seeded choices differ from each other yet repeat across identical requests.
        choices = [
            params if params.seed is None else replace(params, seed=params.seed + index)
            for index in range(body.n)
        ]
        return Job(request_id, list(prompt_ids), choices, self.press)

    async def _respond(self, request: Request, job: Job, envelope: Envelope, body) -> Response:
        ticket = self.admission.admit(job.engine_request_ids)
        trace = self.metrics.trace(len(job.params))
        token_text = self._token_text
        if body.stream:
            writer = ChunkWriter(envelope, len(job.params), token_text, body.include_usage)

            async def events():
                completed = False
                try:
                    async with aclosing(run_choices(self.llm, job)) as outputs:
                        aborted = False
                        async for index, output in outputs:
                            trace.observe(index, output)
                            aborted |= output.finish_reason == "abort"
                            for event in writer.events(index, output):
                                yield event
                    completed = not aborted
                    for event in writer.closing(len(job.prompt_ids)):
                        yield event
                except EngineDeadError as error:
                    logger.error("request %s failed: %s", job.request_id, error)
                    yield sse(error_body("the engine failed; retry", "server_error"))
                    yield b"data: [DONE]\n\n"
                finally:
                    trace.finish(completed)

            def on_close() -> None:
                ticket.release()
                trace.finish(False)  # no-op after the generator's own finish

            headers = {"Cache-Control": "no-cache", "X-Request-Id": job.request_id}
            return EventStream(events(), on_close, headers)
        completed = False
        try:
            finals = await unless_disconnected(collect(self.llm, job, trace.observe), request.receive)
            completed = all(f.finish_reason != "abort" for f in finals)
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except EngineDeadError as error:
            logger.error("request %s failed: %s", job.request_id, error)
            raise ApiError(500, "the engine failed; retry", type="server_error") from None
        finally:
            ticket.release()
            trace.finish(completed)
        if not completed:
            raise ApiError(
                503, "the server shut down before the request finished", type="service_unavailable"
            )
        return JSONResponse(response_object(envelope, finals, len(job.prompt_ids), token_text))

    def _token_text(self, token_id: int) -> str:
        return self.llm.engine.detokenize([token_id])
