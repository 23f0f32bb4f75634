"""A server configured with a press runs every request with it: the answer is the engine's own with that
press, and the eviction shows in /metrics; a budget the press cannot run is a 400."""

import httpx

from kvlab.engine.request import SamplingParams
from kvlab.llm import LLM
from kvlab.server.config import PressSpec

from .helpers import MODEL, scrape, serve_app

PROMPT = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"


def test_a_served_press_gives_the_engines_answer_with_that_press(tiny):
    spec = PressSpec.from_dict({"name": "snapkv", "compression_ratio": 0.5, "window": 4})
    expected = LLM(tiny.loaded, num_blocks=64).generate(
        PROMPT, SamplingParams(max_tokens=8), press=spec.build()
    )
    with serve_app(tiny.engine(), press=spec) as server:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
            answer = client.post("/v1/completions", json=body)
            assert answer.status_code == 200
            assert answer.json()["choices"][0]["text"] == expected[0].text
        assert scrape(server.base_url)[("kvlab_press_evicted_tokens_total", ())] > 0


def test_a_budget_the_press_cannot_run_is_a_bad_request(tiny):
    spec = PressSpec.from_dict({"name": "snapkv", "max_cache_tokens": 2, "window": 4})  # below window + 1
    with serve_app(tiny.engine(), press=spec) as server:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
            refused = client.post("/v1/completions", json=body)
            assert refused.status_code == 400 and refused.json()["error"]["type"] == "invalid_request_error"
            assert server.stats().num_used_blocks == 0
