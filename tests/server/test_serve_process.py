"""`kvlab serve` as a process: it binds loopback only, drains on SIGTERM (the request in flight
finishes, new ones are refused, readiness drops) and exits 0; with the embedded SmolLM2 the openai
client gets the engine's greedy text and chats through the model's real chat template."""

import json
import signal
import time

import httpx
import openai
import psutil
import pytest

from kvlab.engine.request import SamplingParams
from kvlab.llm import LLM

from .helpers import chat_prompt_ids, free_port, kvlab_process, sse_data, wait_for_ready, wait_until

EXIT_TIMEOUT_S = 30


def listening_addresses(pid: int) -> set[str]:
    connections = psutil.Process(pid).net_connections(kind="inet")
    return {c.laddr.ip for c in connections if c.status == psutil.CONN_LISTEN}


def stop(process) -> str:
    if process.poll() is None:
        process.kill()
    return process.communicate(timeout=EXIT_TIMEOUT_S)[0]


def test_sigterm_drains_in_flight_requests_then_exits_0():
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = ["serve", "--model", "tiny-llama", "--port", str(port), "--set", "engine.num_blocks=64"]
    process = kvlab_process(args, slow_step_s=0.02)  # 60 tokens take >= 1.2 s: in flight during the checks
    try:
        wait_for_ready(base, process)
        assert listening_addresses(process.pid) == {"127.0.0.1"}
        body = {"model": "tiny-llama", "prompt": "Hi", "max_tokens": 60, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=base, timeout=60) as client:
            with client.stream("POST", "/v1/completions", json=body) as stream:
                lines = stream.iter_lines()
                next(lines)
                process.send_signal(signal.SIGTERM)
                assert wait_until(lambda: client.get("/ready").status_code == 503, timeout=10)
                refused = client.post("/v1/completions", json=body | {"stream": False, "max_tokens": 1})
                assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
                events = sse_data(lines)
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        started = time.monotonic()
        assert process.wait(timeout=EXIT_TIMEOUT_S) == 0
        assert time.monotonic() - started < EXIT_TIMEOUT_S
    finally:
        output = stop(process)
    assert "Traceback" not in output, output


@pytest.mark.integration
def test_kvlab_serve_smollm2_answers_the_openai_client(smollm2):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process = kvlab_process(["serve", "--model", "smollm2-135m", "--port", str(port)])
    try:
        wait_for_ready(base, process, timeout=300)
        llm = LLM(smollm2, num_blocks=64)
        with openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120) as client:
            prompt = "The capital of France is"
            completion = client.completions.create(
                model="smollm2-135m", prompt=prompt, max_tokens=16, temperature=0
            )
            expected = llm.generate(prompt, SamplingParams(max_tokens=16))[0].text
            assert completion.choices[0].text == expected and expected.strip()

            messages = [{"role": "user", "content": "What is the capital of France?"}]
            chat = client.chat.completions.create(
                model="smollm2-135m", messages=messages, max_tokens=24, temperature=0
            )
            prompt_ids = chat_prompt_ids(smollm2.tokenizer, messages[0]["content"])
            expected_chat = llm.generate(prompt_ids, SamplingParams(max_tokens=24))[0].text
            assert chat.choices[0].message.content == expected_chat
            assert "Paris" in expected_chat  # the real weights and template give a real answer
            assert chat.usage.prompt_tokens == len(prompt_ids)
            stream = client.chat.completions.create(
                model="smollm2-135m", messages=messages, max_tokens=24, temperature=0, stream=True
            )
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected_chat
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=EXIT_TIMEOUT_S) == 0
    finally:
        output = stop(process)
    assert "Traceback" not in output, output
