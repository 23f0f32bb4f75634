"""Streaming clients over real HTTP (httpx): one request's server-sent events, timed as they arrive,
and N concurrent clients working through a list of requests.

A request's outcome is one of: completed (its stream ended with `data: [DONE]`), aborted (the client
disconnected on purpose after `abort_after` chunks with tokens), or an error (an HTTP status other
than 200, an `error` event, a stream that broke or ended without [DONE], a timeout).
"""

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx

from kvlab.bench.loadgen.workload import LoadRequest

COMPLETIONS = "/v1/completions"


@dataclass(slots=True)
class RequestRecord:
    """What one client saw of one request; times are seconds since the run started."""

    index: int
    prompt_len: int
    max_tokens: int
    abort_after: int | None
    start_s: float = 0.0
    token_times_s: list[float] = field(default_factory=list)  # arrival of each chunk that carried tokens
    end_s: float = 0.0
    status: int | None = None  # HTTP status; None when no response arrived
    outcome: str = "error"  # "completed" | "aborted" | "error"
    error: str | None = None
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int | None = None  # the server's usage count (completed requests)
    replica: str | None = None  # the response's replica header, where the server sends one

    @property
    def num_tokens(self) -> int:
        """Output tokens: the server's count when the request completed, else chunks received."""
        return self.completion_tokens if self.completion_tokens is not None else len(self.token_times_s)


def request_body(request: LoadRequest, model: str, ignore_eos: bool) -> dict:
    """A greedy streaming completion of the request's prompt token ids, usage in the last chunk.
    `ignore_eos` (kvlab serve's extension, as vLLM's) fixes the output length at max_tokens."""
    return {
        "model": model,
        "prompt": request.prompt_ids,
        "max_tokens": request.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    } | ({"ignore_eos": True} if ignore_eos else {})


async def stream_request(
    client: httpx.AsyncClient,
    request: LoadRequest,
    body: dict,
    t0: float,
    timeout_s: float,
    replica_header: str | None = None,
) -> RequestRecord:
    record = RequestRecord(request.index, len(request.prompt_ids), request.max_tokens, request.abort_after)
    record.start_s = time.perf_counter() - t0
    try:
        async with asyncio.timeout(timeout_s):
            await _read_stream(client, request, body, t0, record, replica_header)
    except TimeoutError:
        record.outcome, record.error = "error", f"no end within {timeout_s} s"
    except httpx.HTTPError as error:
        record.outcome, record.error = "error", f"{type(error).__name__}: {error}"
    record.end_s = time.perf_counter() - t0
    return record


async def _read_stream(client, request, body, t0, record, replica_header) -> None:
    async with client.stream("POST", COMPLETIONS, json=body) as response:
        record.status = response.status_code
        if replica_header:
            record.replica = response.headers.get(replica_header)
        if response.status_code != 200:
            record.error = (await response.aread()).decode(errors="replace")[:300]
            return
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                record.outcome = "completed"
                return
            event = json.loads(data)
            if "error" in event:
                record.error = json.dumps(event["error"])[:300]
                return
            if event.get("usage"):
                record.completion_tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices") or []:
                record.text += choice.get("text") or ""
                record.finish_reason = choice.get("finish_reason") or record.finish_reason
                if _carries_tokens(choice):
                    record.token_times_s.append(time.perf_counter() - t0)
            if request.abort_after is not None and len(record.token_times_s) >= request.abort_after:
                record.outcome = "aborted"  # leaving the block closes the connection mid-stream
                return
        record.error = "the stream ended without data: [DONE]"


def _carries_tokens(choice: dict) -> bool:
    """A chunk of generated output (its text may be empty while a multi-byte character is incomplete)
    rather than the final chunk that only reports the finish reason."""
    return bool(choice.get("text")) or choice.get("finish_reason") is None


async def run_clients(
    base_url: str,
    requests: list[LoadRequest],
    model: str,
    num_clients: int,
    timeout_s: float,
    ignore_eos: bool,
    replica_header: str | None = None,
) -> tuple[list[RequestRecord], float]:
    """`num_clients` concurrent clients take the requests in order, each sending its next when its
    last one ended. Returns the records (in request order) and the wall time from the first send to
    the last end."""
    queue: asyncio.Queue[LoadRequest] = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)
    records: list[RequestRecord] = []
    limits = httpx.Limits(max_connections=num_clients, max_keepalive_connections=num_clients)
    async with httpx.AsyncClient(
        base_url=base_url, limits=limits, timeout=httpx.Timeout(timeout_s)
    ) as client:
        t0 = time.perf_counter()

        async def client_loop() -> None:
            while not queue.empty():
                request = queue.get_nowait()
                body = request_body(request, model, ignore_eos)
                records.append(await stream_request(client, request, body, t0, timeout_s, replica_header))

        await asyncio.gather(*(client_loop() for _ in range(num_clients)))
        wall_s = time.perf_counter() - t0
    return sorted(records, key=lambda record: record.index), wall_s
