"""Bad requests: every one answers a 4xx in OpenAI's error shape, logs no traceback (and nothing at
ERROR), and leaves the server serving the next good request."""

import json
import logging
import os

import httpx
import pytest

from .helpers import MODEL, serve_app

KEY_ENV = "KVLAB_TEST_SERVER_KEY"
KEY = "s3cret-key"
MAX_BODY = 4096
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def keyed_server(tiny):
    """A server that requires an API key and caps bodies at MAX_BODY bytes."""
    os.environ[KEY_ENV] = KEY  # read once, when the app is built
    try:
        llm = tiny.engine()
        with serve_app(llm, api_key_env=KEY_ENV, max_body_bytes=MAX_BODY, max_queue=8) as thread:
            os.environ.pop(KEY_ENV, None)
            yield thread
    finally:
        os.environ.pop(KEY_ENV, None)


def completion(**fields):
    return ("/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 2} | fields)


def chat(**fields):
    return (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]} | fields,
    )


def without(request, key):
    path, body = request
    return path, {k: v for k, v in body.items() if k != key}


# (id, (path, JSON body | raw bytes), headers, expected status, expected `param` or None)
CASES = [
    ("malformed-json", ("/v1/completions", b'{"model": "tiny-llama", "prompt": '), AUTH, 400, None),
    ("json-array", ("/v1/completions", b"[1, 2]"), AUTH, 400, None),
    (
        "json-nan",
        ("/v1/completions", b'{"model": "tiny-llama", "prompt": "x", "temperature": NaN}'),
        AUTH,
        400,
        None,
    ),
    ("not-utf8", ("/v1/completions", b'{"model": "\xff"}'), AUTH, 400, None),
    ("max-tokens-string", completion(max_tokens="16"), AUTH, 400, "max_tokens"),
    ("temperature-string", completion(temperature="hot"), AUTH, 400, "temperature"),
    ("stream-string", completion(stream="yes"), AUTH, 400, "stream"),
    ("n-bool", completion(n=True), AUTH, 400, "n"),
    ("max-tokens-negative", completion(max_tokens=-1), AUTH, 400, "max_tokens"),
    ("max-tokens-zero", completion(max_tokens=0), AUTH, 400, "max_tokens"),
    ("max-tokens-huge", completion(max_tokens=10**12), AUTH, 400, "max_tokens"),
    ("chat-max-tokens-huge", chat(max_completion_tokens=10**40), AUTH, 400, "max_completion_tokens"),
    ("prompt-over-context", completion(prompt=[17] * 600), AUTH, 400, "prompt"),
    ("chat-over-context", chat(messages=[{"role": "user", "content": "word " * 600}]), AUTH, 400, "messages"),
    ("prompt-empty", completion(prompt=""), AUTH, 400, None),
    ("prompt-token-out-of-vocab", completion(prompt=[5, 10**9]), AUTH, 400, None),
    ("prompt-batch-of-two", completion(prompt=["a", "b"]), AUTH, 400, "prompt"),
    ("prompt-wrong-type", completion(prompt={"text": "a"}), AUTH, 400, "prompt"),
    ("unknown-model", completion(model="gpt-17"), AUTH, 404, "model"),
    ("messages-empty", chat(messages=[]), AUTH, 400, "messages"),
    ("message-bad-role", chat(messages=[{"role": "wizard", "content": "hi"}]), AUTH, 400, "messages[0].role"),
    (
        "message-content-number",
        chat(messages=[{"role": "user", "content": 7}]),
        AUTH,
        400,
        "messages[0].content",
    ),
    ("stop-empty-string", completion(stop=""), AUTH, 400, "stop"),
    ("stop-five-strings", completion(stop=["a", "b", "c", "d", "e"]), AUTH, 400, "stop"),
    ("stop-not-a-string", completion(stop=[1]), AUTH, 400, "stop"),
    ("n-zero", completion(n=0), AUTH, 400, "n"),
    ("n-beyond-the-queue", completion(n=9), AUTH, 400, "n"),
    ("n-a-billion", completion(n=10**9), AUTH, 400, "n"),
    ("temperature-negative", completion(temperature=-0.5), AUTH, 400, "temperature"),
    ("top-p-above-one", completion(top_p=1.5), AUTH, 400, "top_p"),
    ("top-p-zero", completion(top_p=0), AUTH, 400, "top_p"),
    ("seed-negative", completion(seed=-1), AUTH, 400, "seed"),
    ("unknown-field", completion(frobnicate=1), AUTH, 400, "frobnicate"),
    ("tools-unsupported", chat(tools=[{"type": "function"}]), AUTH, 400, "tools"),
    ("missing-prompt", without(completion(), "prompt"), AUTH, 400, "prompt"),
    ("missing-model", without(chat(), "model"), AUTH, 400, "model"),
    ("missing-messages", without(chat(), "messages"), AUTH, 400, "messages"),
    ("echo-true", completion(echo=True), AUTH, 400, "echo"),
    ("presence-penalty", completion(presence_penalty=0.5), AUTH, 400, "presence_penalty"),
    ("logprobs-too-many", completion(logprobs=6), AUTH, 400, "logprobs"),
    ("top-logprobs-without-logprobs", chat(top_logprobs=2), AUTH, 400, "top_logprobs"),
    (
        "stream-options-without-stream",
        completion(stream_options={"include_usage": True}),
        AUTH,
        400,
        "stream_options",
    ),
    ("missing-key", completion(), {}, 401, None),
    ("wrong-key", completion(), {"Authorization": "Bearer wrong"}, 401, None),
    ("key-wrong-scheme", completion(), {"Authorization": f"Basic {KEY}"}, 401, None),
    ("models-missing-key", ("/v1/models", None), {}, 401, None),
    ("oversized-body", completion(prompt="x" * MAX_BODY), AUTH, 413, None),
    ("unknown-route", ("/v1/embeddings", {"model": MODEL}), AUTH, 404, None),
]


def send(client: httpx.Client, request, headers) -> httpx.Response:
    path, body = request
    if body is None:
        return client.get(path, headers=headers)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(path, content=content, headers={"Content-Type": "application/json", **headers})


@pytest.mark.parametrize(
    ("request_", "headers", "status", "param"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_request_gets_an_openai_error_and_the_server_goes_on(
    keyed_server, request_, headers, status, param, caplog
):
    caplog.set_level(logging.INFO)
    with httpx.Client(base_url=keyed_server.base_url, timeout=60) as client:
        response = send(client, request_, headers)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert isinstance(error["message"], str) and error["message"] and "Traceback" not in error["message"]
        assert error["type"] == "invalid_request_error"
        if param is not None:
            assert error["param"] == param
        good = send(client, completion(max_tokens=1), AUTH)
        assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 1
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_a_chunked_body_over_the_limit_is_refused_while_reading(keyed_server):
    def chunks():  # no Content-Length: the server counts what arrives
        yield b'{"model": "tiny-llama", "prompt": "'
        for _ in range(MAX_BODY // 64 + 1):
            yield b"x" * 64
        yield b'"}'

    with httpx.Client(base_url=keyed_server.base_url, timeout=60) as client:
        response = client.post("/v1/completions", content=chunks(), headers=AUTH)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_the_key_opens_the_models_route_and_health_needs_none(keyed_server):
    with httpx.Client(base_url=keyed_server.base_url, timeout=60) as client:
        assert client.get("/v1/models", headers=AUTH).status_code == 200
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 200
        assert client.get("/metrics").status_code == 200


def test_a_temperature_near_zero_samples_the_greedy_tokens(keyed_server):
    # It overflowed the scaled logits to NaN, failed the engine's step and every request in flight.
    with httpx.Client(base_url=keyed_server.base_url, timeout=60) as client:
        greedy = send(client, completion(max_tokens=4, temperature=0), AUTH)
        cold = send(client, completion(max_tokens=4, temperature=1e-40, seed=3), AUTH)
    assert greedy.status_code == cold.status_code == 200, cold.text
    assert cold.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


def test_the_matrix_has_at_least_twenty_cases():
    assert len(CASES) >= 20 and len({c[0] for c in CASES}) == len(CASES)
