"""The official `openai` client against a real server: completions, chat, streaming, n, usage,
logprobs; greedy text equals the engine's own (`LLM.generate`) for the same prompt."""

import math

import openai
import pytest

from kvlab.engine.request import SamplingParams
from kvlab.llm import LLM

from .helpers import MODEL, chat_prompt_ids

PROMPT = "The quick brown fox jumps over the lazy dog because"


@pytest.fixture
def oai(server):
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def reference(tiny):
    """The engine's greedy text, without HTTP: what the server must answer."""
    llm = LLM(tiny.loaded, num_blocks=64)

    def greedy(prompt, max_tokens, **params):
        return llm.generate(prompt, SamplingParams(max_tokens=max_tokens, **params))[0]

    return greedy


def test_greedy_completion_equals_llm_generate(oai, reference):
    response = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    expected = reference(PROMPT, 12)
    (choice,) = response.choices
    assert choice.text == expected.text and choice.text
    assert choice.finish_reason == expected.finish_reason == "length"
    assert response.object == "text_completion" and response.model == MODEL
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.completion_tokens == 12
    assert response.usage.total_tokens == response.usage.prompt_tokens + 12


def test_completion_from_token_ids_and_a_batch_of_one(oai, reference, tiny):
    ids = tiny.loaded.tokenizer.encode(PROMPT)
    expected = reference(PROMPT, 6).text
    for prompt in (ids, [ids], [PROMPT]):
        assert (
            oai.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0).choices[0].text
            == expected
        )


def test_streamed_completion_concatenates_to_the_whole_text(oai, reference):
    stream = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, stream=True)
    pieces, reasons = [], []
    for chunk in stream:
        for choice in chunk.choices:
            pieces.append(choice.text)
            reasons.append(choice.finish_reason)
    assert "".join(pieces) == reference(PROMPT, 10).text
    assert reasons[-1] == "length" and set(reasons[:-1]) == {None}


def test_chat_uses_the_models_chat_template(oai, reference, tiny):
    response = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello there"}], max_tokens=8, temperature=0
    )
    prompt_ids = chat_prompt_ids(tiny.loaded.tokenizer, "Hello there")
    expected = reference(prompt_ids, 8)
    (choice,) = response.choices
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert response.object == "chat.completion"
    assert response.usage.prompt_tokens == len(prompt_ids) and response.usage.completion_tokens == 8


def test_streamed_chat_equals_the_non_streamed_answer_and_reports_usage(oai):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    whole = oai.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=9, temperature=0
    )
    stream = oai.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_completion_tokens=9,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_n_choices(oai, reference):
    greedy = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, n=2)
    assert [c.index for c in greedy.choices] == [0, 1]
    assert [c.text for c in greedy.choices] == [reference(PROMPT, 5).text] * 2
    assert greedy.usage.completion_tokens == 10
    sampled = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=1.0, seed=3, n=2
    )
    again = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=1.0, seed=3, n=2
    )
    texts = [c.message.content for c in sampled.choices]
    assert texts == [c.message.content for c in again.choices]  # seeded: repeatable
    assert texts[0] != texts[1]  # each choice has its own seed


def test_streamed_n_choices_each_reach_their_end(oai):
    stream = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        n=3,
        stream=True,
    )
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in stream if c.choices[0].finish_reason}
    assert finished == {0: "length", 1: "length", 2: "length"}


def test_stop_strings_cut_the_text(oai, reference):
    full = reference(PROMPT, 12).text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    response = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert response.choices[0].text == full[: full.index(stop)]
    assert response.choices[0].finish_reason == "stop"


def test_logprobs(oai, reference, tiny):
    completion = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2)
    logprobs = completion.choices[0].logprobs
    expected = reference(PROMPT, 4, logprobs=2)
    assert logprobs.token_logprobs == pytest.approx([e.logprob for e in expected.logprobs])
    assert "".join(logprobs.tokens) == completion.choices[0].text
    assert all(
        len(top) == 2 and max(top.values()) == pytest.approx(lp)
        for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs, strict=True)
    )
    chat = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=1,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(math.isfinite(c.logprob) and c.logprob <= 0 for c in content)
    assert [c.top_logprobs[0].token for c in content] == [c.token for c in content]  # greedy: the top one


def test_models_lists_the_served_model(oai):
    assert [m.id for m in oai.models.list().data] == [MODEL]


def test_an_unknown_model_is_not_found(oai):
    with pytest.raises(openai.NotFoundError) as raised:
        oai.completions.create(model="gpt-17", prompt="hi", max_tokens=2)
    assert raised.value.body["code"] == "model_not_found"
