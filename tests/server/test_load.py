"""Under load: concurrent streaming clients over real HTTP, some of which leave mid-stream. No server
errors, no KV block left in use, every finished greedy output equal to the engine's unloaded output for
its prompt, and /metrics (parsed by prometheus_client) counting exactly what the clients did."""

import asyncio
import json
import logging
import random

import httpx
import pytest

from kvlab.engine.request import SamplingParams
from kvlab.llm import LLM

from .helpers import chat_prompt_ids, requests_counted, scrape, serve_app, wait_until

WORDS = "the a river mountain quiet signal engine forest token paper light seven north over under".split()
ABORT_EVERY = 10  # clients 0, 10, 20, ... leave after their second event
ABORT_AFTER_EVENTS = 2
ABORTER_MAX_TOKENS = 400  # long enough that the server is still generating when they leave


def workload(num_clients: int, max_new_tokens: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    clients = []
    for i in range(num_clients):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20)))
        aborts = i % ABORT_EVERY == 0
        clients.append(
            {
                "chat": i % 2 == 1,
                "text": text,
                "max_tokens": ABORTER_MAX_TOKENS if aborts else rng.randint(4, max_new_tokens),
                "aborts": aborts,
            }
        )
    return clients


def request_body(model: str, client: dict) -> tuple[str, dict]:
    common = {
        "model": model,
        "max_tokens": client["max_tokens"],
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    if client["chat"]:
        return "/v1/chat/completions", common | {"messages": [{"role": "user", "content": client["text"]}]}
    return "/v1/completions", common | {"prompt": client["text"]}


async def run_client(http: httpx.AsyncClient, model: str, client: dict) -> dict:
    path, body = request_body(model, client)
    text, events = "", 0
    async with http.stream("POST", path, json=body) as response:
        status = response.status_code
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            for choice in chunk["choices"]:
                text += choice["delta"].get("content", "") if client["chat"] else choice["text"]
            events += 1
            if client["aborts"] and events >= ABORT_AFTER_EVENTS:
                break  # leaving the block closes the connection mid-stream
    return {"status": status, "text": text}


async def run_clients(base_url: str, model: str, clients: list[dict]) -> list[dict]:
    limits = httpx.Limits(max_connections=len(clients))
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as http:
        return await asyncio.gather(*(run_client(http, model, c) for c in clients))


def unloaded_texts(loaded, clients: list[dict]) -> list[str | None]:
    """Each finishing client's expected text: its prompt alone on a fresh engine."""
    llm = LLM(loaded, num_blocks=128)
    texts = []
    for client in clients:
        if client["aborts"]:
            texts.append(None)
            continue
        prompt = chat_prompt_ids(loaded.tokenizer, client["text"]) if client["chat"] else client["text"]
        params = SamplingParams(max_tokens=client["max_tokens"], ignore_eos=True)
        texts.append(llm.generate(prompt, params)[0].text)
    return texts


def check_load(llm, loaded, model: str, num_clients: int, max_new_tokens: int, caplog) -> None:
    caplog.set_level(logging.INFO)
    clients = workload(num_clients, max_new_tokens)
    expected = unloaded_texts(loaded, clients)
    with serve_app(llm, model=model) as server:
        results = asyncio.run(run_clients(server.base_url, model, clients))
        num_aborted = sum(c["aborts"] for c in clients)

        def settled():
            metrics = scrape(server.base_url)
            return (
                metrics[("kvlab_kv_blocks_used", ())] == 0
                and metrics[("kvlab_aborted_requests_total", ())] == num_aborted
            )

        assert wait_until(settled, timeout=30)
        metrics = scrape(server.base_url)

    assert [r["status"] for r in results] == [200] * num_clients
    for client, result, text in zip(clients, results, expected, strict=True):
        if not client["aborts"]:
            assert result["text"] == text, client
    num_chat = sum(c["chat"] for c in clients)
    assert requests_counted(metrics, "/v1/chat/completions", 200) == num_chat
    assert requests_counted(metrics, "/v1/completions", 200) == num_clients - num_chat
    assert not [
        key for key in metrics if key[0] == "kvlab_requests_total" and dict(key[1])["status"] != "200"
    ]
    assert metrics[("kvlab_aborted_requests_total", ())] == num_aborted
    assert metrics[("kvlab_running_requests", ())] == metrics[("kvlab_queue_depth", ())] == 0
    assert metrics[("kvlab_kv_blocks_used", ())] == 0 and metrics[("kvlab_kv_blocks_total", ())] > 0
    assert metrics[("kvlab_e2e_request_latency_seconds_count", ())] == num_clients - num_aborted
    assert metrics[("kvlab_time_to_first_token_seconds_count", ())] == num_clients
    finished_tokens = sum(c["max_tokens"] for c in clients if not c["aborts"])
    assert metrics[("kvlab_generated_tokens_total", ())] >= finished_tokens + num_aborted
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_concurrent_streaming_clients_with_aborts(tiny, caplog):
    check_load(tiny.engine(num_blocks=512), tiny.loaded, "tiny-llama", 40, 24, caplog)


@pytest.mark.integration
def test_sixty_four_clients_on_smollm2(smollm2, caplog):
    from kvlab.engine.async_engine import AsyncLLM

    check_load(AsyncLLM(smollm2, num_blocks=1024), smollm2, "smollm2-135m", 64, 12, caplog)
