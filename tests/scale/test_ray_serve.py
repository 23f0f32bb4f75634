"""Two Ray Serve replicas of the OpenAI app on a local Ray cluster of 2 CPUs, one replica per CPU, each
its own process and engine: the official `openai` client reaches both through one URL, both give the
offline engine's greedy text, streaming through Ray's proxy equals the non-streamed answer, and each
replica's /metrics (its own registry) shows no block in use afterwards."""

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvlab.bench.loadgen.counters import scrape_replicas, total
from kvlab.bench.loadgen.launch import free_port

ray = pytest.importorskip("ray", reason="Ray is an optional dependency (pip install 'kvlab[ray]')")
# Ray Serve's own pydantic models use a keyword pydantic 2 deprecates; nothing of kvlab's.
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`:DeprecationWarning")
openai = pytest.importorskip("openai")

PROMPT = "The history of the city begins"


@pytest.fixture(scope="module")
def replicas(tiny_llama_dir):
    from kvlab.scale.cluster import ray_session
    from kvlab.scale.ray_serve import serve_replicas

    config = {"model": str(tiny_llama_dir), "engine": {"num_blocks": 64, "max_num_seqs": 4}}
    with (
        ray_session(num_cpus=2),
        serve_replicas(config, num_replicas=2, replica_cpus=1, port=free_port()) as url,
    ):
        yield url
    assert not ray.is_initialized()


@pytest.fixture
def client(replicas):
    return openai.OpenAI(base_url=f"{replicas}/v1", api_key="unused", max_retries=0, timeout=120)


def test_two_replicas_answer_the_same_client(client, tiny_llama_dir):
    from kvlab.engine.request import SamplingParams
    from kvlab.llm import LLM
    from kvlab.scale.ray_serve import REPLICA_HEADER

    def ask():
        raw = client.completions.with_raw_response.create(
            model=str(tiny_llama_dir), prompt=PROMPT, max_tokens=12, temperature=0
        )
        return raw.headers[REPLICA_HEADER], raw.parse().choices[0].text

    # Requests in flight together: Ray's router sends each to the less busy of two replicas, where
    # requests one at a time (every replica idle) once all went to one replica. Rounds go on for a
    # while, as the proxy may learn of the second replica after the deployment reports running.
    texts = {}
    deadline = time.monotonic() + 60
    with ThreadPoolExecutor(4) as pool:
        while len(texts) < 2 and time.monotonic() < deadline:
            for replica, text in pool.map(lambda _: ask(), range(4)):
                texts.setdefault(replica, []).append(text)
    assert len(texts) == 2, texts
    pids = {replica.split(" pid ")[1] for replica in texts}
    assert len(pids) == 2 and str(os.getpid()) not in pids  # two processes, neither this one
    offline = LLM(str(tiny_llama_dir), num_blocks=64).generate(PROMPT, SamplingParams(max_tokens=12))[0].text
    assert {text for answers in texts.values() for text in answers} == {offline}


def test_streaming_through_the_proxy_equals_the_plain_answer(client, tiny_llama_dir):
    model = str(tiny_llama_dir)
    plain = client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0)
    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == plain.choices[0].text
    messages = [{"role": "user", "content": "Tell me about the city."}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0)
    chunks = client.chat.completions.create(
        model=model, messages=messages, max_tokens=10, temperature=0, stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == chat.choices[0].message.content and streamed


def test_each_replica_has_its_own_metrics_and_frees_its_blocks(client, replicas, tiny_llama_dir):
    from kvlab.scale.ray_serve import REPLICA_HEADER

    for _ in range(4):
        client.completions.create(model=str(tiny_llama_dir), prompt=PROMPT, max_tokens=4, temperature=0)
    scrapes = scrape_replicas(replicas, 2, REPLICA_HEADER)
    assert len(scrapes) == 2
    assert total(scrapes, "kvlab_kv_blocks_used") == 0 and total(scrapes, "kvlab_kv_blocks_total") == 128
    answered = [
        s.value("kvlab_requests_total", endpoint="/v1/completions", status="200") or 0
        for s in scrapes.values()
    ]
    assert sum(answered) >= 4


def test_a_client_that_leaves_mid_stream_aborts_its_request_on_the_replica(replicas, tiny_llama_dir):
    import httpx

    from kvlab.bench.loadgen.counters import wait_idle
    from kvlab.scale.ray_serve import REPLICA_HEADER

    before = scrape_replicas(replicas, 2, REPLICA_HEADER)
    body = {
        "model": str(tiny_llama_dir),
        "prompt": PROMPT,
        "max_tokens": 400,
        "stream": True,
        "ignore_eos": True,
    }
    with (
        httpx.Client(base_url=replicas, timeout=60) as http,
        http.stream("POST", "/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        next(line for line in response.iter_lines() if line.startswith("data:"))  # one chunk, then leave
    after, _ = wait_idle(replicas, 2, REPLICA_HEADER)
    assert total(after, "kvlab_kv_blocks_used") == 0 and total(after, "kvlab_running_requests") == 0
    assert total(after, "kvlab_aborted_requests_total") - total(before, "kvlab_aborted_requests_total") == 1
    # Far fewer than the 400 tokens asked for: the replica stopped when the client left.
    generated = total(after, "kvlab_generated_tokens_total") - total(before, "kvlab_generated_tokens_total")
    assert 1 <= generated < 200


def test_rays_cancellation_reaches_the_app_as_an_asgi_disconnect():
    """Ray's receive() raises TaskCancelledError when its proxy cancels a request; the app must see
    http.disconnect (what uvicorn sends), not an exception it would report as an internal error."""
    import asyncio

    from ray.exceptions import TaskCancelledError

    from kvlab.scale.ray_serve import REPLICA_HEADER, ReplicaAdapter

    seen, sent = [], []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        seen.append(await receive())

    async def cancelled_receive():
        raise TaskCancelledError()

    async def send(message):
        sent.append(message)

    asyncio.run(ReplicaAdapter(app, "r1 pid 1")({"type": "http"}, cancelled_receive, send))
    assert seen == [{"type": "http.disconnect"}]
    assert (REPLICA_HEADER.encode(), b"r1 pid 1") in sent[0]["headers"]


def test_more_replicas_than_the_cluster_has_cpus_is_an_error_not_a_wait(replicas, tiny_llama_dir):
    from kvlab.errors import ConfigError
    from kvlab.scale.ray_serve import serve_replicas

    with pytest.raises(ConfigError, match="need 3 CPUs; the Ray cluster has 2"):
        with serve_replicas({"model": str(tiny_llama_dir)}, num_replicas=3, port=free_port()):
            pass
