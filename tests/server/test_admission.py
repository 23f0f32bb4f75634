"""Behaviour under pressure: a full queue answers 429 with Retry-After; a client that leaves aborts its
request and frees its KV blocks; a drain lets requests in flight finish (or aborts them at the timeout)
while refusing new ones. Engine steps are slowed so that requests are reliably in flight."""

import json
import logging
import threading

import httpx
import pytest

from kvlab.server.config import ServerConfig

from .helpers import MODEL, requests_counted, scrape, serve_app, slow_steps, sse_data, wait_until

LONG = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "temperature": 0}


@pytest.fixture
def slow_server(tiny):
    llm = tiny.engine()
    slow_steps(llm, 0.02)
    with serve_app(llm, max_queue=2, drain_timeout_s=30) as thread:
        yield thread


def idle(server) -> bool:
    stats = server.stats()
    return stats.num_used_blocks == 0 and stats.num_running == 0 and server.state.admission.num_in_flight == 0


def test_a_full_queue_answers_429_with_retry_after(slow_server):
    with httpx.Client(base_url=slow_server.base_url, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json=LONG | {"stream": True}) as first:
            with client.stream("POST", "/v1/completions", json=LONG | {"stream": True}) as second:
                assert first.status_code == second.status_code == 200
                refused = client.post("/v1/completions", json=LONG)
                assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
                assert refused.json()["error"]["code"] == "queue_full"
                never = client.post("/v1/completions", json=LONG | {"n": 3})
                assert never.status_code == 400 and never.json()["error"]["param"] == "n"  # can never fit
        assert wait_until(lambda: idle(slow_server))
        assert client.post("/v1/completions", json=LONG | {"max_tokens": 2}).status_code == 200
    metrics = scrape(slow_server.base_url)
    assert requests_counted(metrics, "/v1/completions", 429) == 1


def no_errors_logged(caplog) -> bool:
    return "Traceback" not in caplog.text and not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_streaming_client_that_disconnects_frees_its_blocks(slow_server, caplog):
    caplog.set_level(logging.INFO)
    with httpx.Client(base_url=slow_server.base_url, timeout=60) as client:
        with client.stream("POST", "/v1/chat/completions", json=chat_long(stream=True)) as response:
            lines = response.iter_lines()
            assert sse_data(next(lines) for _ in range(4))  # a few events: the request runs
            assert slow_server.stats().num_used_blocks > 0
        # Leaving the `with` closes the connection mid-stream.
        assert wait_until(lambda: idle(slow_server), timeout=5)  # 400 tokens would take >= 8 s
    metrics = scrape(slow_server.base_url)
    assert metrics[("kvlab_aborted_requests_total", ())] == 1
    assert metrics[("kvlab_kv_blocks_used", ())] == 0
    assert no_errors_logged(caplog)


def test_a_waiting_client_that_disconnects_frees_its_blocks(slow_server, caplog):
    caplog.set_level(logging.INFO)
    with httpx.Client(base_url=slow_server.base_url, timeout=httpx.Timeout(60, read=0.5)) as client:
        with pytest.raises(httpx.ReadTimeout):  # gives up and closes the connection
            client.post("/v1/completions", json=LONG)
    assert wait_until(lambda: idle(slow_server), timeout=5)
    metrics = scrape(slow_server.base_url)
    assert metrics[("kvlab_aborted_requests_total", ())] == 1
    assert requests_counted(metrics, "/v1/completions", 499) == 1  # noted, though nobody read it
    assert no_errors_logged(caplog)


def chat_long(**fields):
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a story"}],
        "max_tokens": 400,
        "ignore_eos": True,
        "temperature": 0,
    } | fields


def test_drain_finishes_requests_in_flight_and_refuses_new_ones(slow_server):
    base = slow_server.base_url
    with httpx.Client(base_url=base, timeout=60) as client:
        with client.stream(
            "POST", "/v1/completions", json=LONG | {"max_tokens": 40, "stream": True}
        ) as stream:
            lines = stream.iter_lines()
            next(lines)
            drained = {}
            drainer = threading.Thread(
                target=lambda: drained.update(ok=slow_server.call(slow_server.state.drain()))
            )
            drainer.start()
            assert wait_until(lambda: slow_server.state.admission.draining)
            assert client.get("/ready").status_code == 503
            assert client.get("/health").status_code == 200  # alive, just not taking work
            refused = client.post("/v1/completions", json=LONG | {"max_tokens": 2})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
            events = sse_data(lines)
        drainer.join(30)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert drained == {"ok": True}
    assert idle(slow_server)


def test_drain_timeout_aborts_what_is_left(tiny):
    llm = tiny.engine()
    slow_steps(llm, 0.02)
    with serve_app(llm, drain_timeout_s=0.3) as server:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            with client.stream("POST", "/v1/completions", json=LONG | {"stream": True}) as stream:
                lines = stream.iter_lines()
                next(lines)
                assert server.call(server.state.drain()) is False
                events = sse_data(lines)
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "abort"
        assert wait_until(lambda: idle(server), timeout=5)
        assert scrape(server.base_url)[("kvlab_aborted_requests_total", ())] == 1


def test_the_server_binds_loopback_unless_told():
    assert ServerConfig().host == "127.0.0.1"
