"""Sliding-window PPL equals a brute-force, token-by-token evaluation of the same protocol."""

import math

import pytest
import torch

from kvlab.bench.core.datasets import load_text
from kvlab.bench.eval.perplexity import DEFAULT_MAX_LENGTH, plan_windows, sliding_window_perplexity
from kvlab.errors import ConfigError

SAMPLE = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness, it was the spring of hope, it was the winter of despair."
)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The CPU is shared: two threads on an oversubscribed machine make tiny forwards ~10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def brute_force_nll(model, ids: list[int], max_length: int, stride: int) -> tuple[float, int, int]:
    """(summed NLL, tokens scored, windows used), one target at a time from full-window logits.

    Protocol, stated independently of the implementation: window k covers
    [k * stride, min(k * stride + max_length, n)); token t is scored by the first window that ends
    after t, provided t is not that window's first token (it needs context inside the window).
    """
    n = len(ids)
    total, scored, used = 0.0, 0, set()
    log_probs_of_window: dict[int, torch.Tensor] = {}
    for t in range(1, n):
        k = 0
        while min(k * stride + max_length, n) <= t:
            k += 1
        begin = k * stride
        if t == begin:
            continue
        if k not in log_probs_of_window:
            window = torch.tensor([ids[begin : min(begin + max_length, n)]])
            with torch.no_grad():
                logits = model(window).logits[0].double()
            log_probs_of_window[k] = torch.log_softmax(logits, dim=-1)
        total -= log_probs_of_window[k][t - begin - 1, ids[t]].item()
        scored += 1
        used.add(k)
    return total, scored, len(used)


def guide_snippet_ppl(model, ids: torch.Tensor, max_length: int, stride: int) -> float:
    """The guide's recipe as published: labels masked with -100, loss weighted by valid labels - 1."""
    ids = ids.unsqueeze(0)
    seq_len = ids.size(1)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        window = ids[:, begin:end]
        labels = window.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(window, labels=labels).loss.item()
        num_loss_tokens = (labels != -100).sum().item() - labels.size(0)
        nll_sum += loss * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end = end
        if end == seq_len:
            break
    return math.exp(nll_sum / n_tokens)


@pytest.mark.parametrize(
    ("num_tokens", "max_length", "stride"), [(10, 4, 2), (37, 8, 3), (20, 5, 5), (9, 16, 8)]
)
def test_windows_score_each_token_once_with_the_promised_context(num_tokens, max_length, stride):
    windows = plan_windows(num_tokens, max_length, stride)
    targets = [t for w in windows for t in range(w.score_from, w.end)]
    assert len(targets) == len(set(targets)) and windows[-1].end == num_tokens
    assert all(w.end - w.begin <= max_length and w.begin % stride == 0 for w in windows)
    if stride < max_length:
        assert sorted(targets) == list(range(1, num_tokens))
        assert all(
            t - w.begin >= min(t, max_length - stride) for w in windows for t in range(w.score_from, w.end)
        )
    else:  # disjoint chunks: each chunk's first token has no context and is skipped, as in the guide
        assert sorted(targets) == [t for t in range(num_tokens) if t % stride != 0]


@pytest.mark.parametrize(
    ("max_length", "stride", "max_tokens"), [(16, 6, None), (16, 16, None), (6, 1, 14), (512, 256, None)]
)
def test_matches_brute_force(tiny_model, max_length, stride, max_tokens):
    result = sliding_window_perplexity(
        tiny_model, SAMPLE, max_length=max_length, stride=stride, max_tokens=max_tokens, show_progress=False
    )
    ids = tiny_model.tokenizer(SAMPLE)["input_ids"]
    assert result.num_text_tokens == len(ids)
    ids = ids[:max_tokens]
    nll_sum, num_scored, num_windows = brute_force_nll(tiny_model.model, ids, max_length, stride)
    assert result.num_tokens == len(ids)
    assert (result.num_tokens_scored, result.num_windows) == (num_scored, num_windows)
    assert result.nll == pytest.approx(nll_sum / num_scored, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(nll_sum / num_scored), rel=1e-4)


def test_guide_ppl_reproduces_the_guide_snippet(tiny_model):
    result = sliding_window_perplexity(tiny_model, SAMPLE, max_length=16, stride=5, show_progress=False)
    ids = torch.tensor(tiny_model.tokenizer(SAMPLE)["input_ids"])
    assert result.guide_ppl == pytest.approx(guide_snippet_ppl(tiny_model.model, ids, 16, 5), rel=1e-5)


def test_one_window_equals_the_models_own_loss(tiny_model):
    ids = torch.tensor([tiny_model.tokenizer(SAMPLE)["input_ids"]])
    with torch.no_grad():
        loss = tiny_model.model(ids, labels=ids).loss.item()
    result = sliding_window_perplexity(tiny_model, SAMPLE, show_progress=False)
    assert result.num_windows == 1 and result.num_tokens_scored == ids.size(1) - 1
    assert result.nll == pytest.approx(loss, rel=1e-5)
    assert result.guide_ppl == pytest.approx(result.ppl, rel=1e-9)


def test_defaults_max_tokens_and_self_description(tiny_model):
    text = load_text("pg19")
    result = sliding_window_perplexity(tiny_model, text, max_tokens=100, show_progress=False)
    # Tiny models have a 512-token context, below the CPU cap.
    assert (result.max_length, result.stride) == (min(512, DEFAULT_MAX_LENGTH), 256)
    assert result.num_tokens == 100 and result.num_text_tokens > 50_000 and result.num_tokens_scored == 99
    assert result.is_meaningful is False and "meaningless" in result.label
    assert not result.prepends_bos and "no BOS" in result.protocol
    assert "max_length 512, stride 256" in result.protocol and "pg19:10146" in result.text_source


class BosTokenizer:
    """Wraps a tokenizer so that it prepends a BOS, as Llama-2 style tokenizers do."""

    def __init__(self, inner, bos_token_id: int):
        self.inner, self.bos_token_id = inner, bos_token_id

    def __call__(self, text, add_special_tokens=True, return_tensors=None, **kwargs):
        ids = self.inner(text, add_special_tokens=False)["input_ids"]
        ids = [self.bos_token_id, *ids] if add_special_tokens else ids
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}


def test_bos_once_before_the_text_is_context_only(tiny_model):
    plain = sliding_window_perplexity(tiny_model, SAMPLE, max_length=16, stride=8, show_progress=False)
    tiny_model_with_bos = type(tiny_model)(
        model=tiny_model.model,
        tokenizer=BosTokenizer(tiny_model.tokenizer, bos_token_id=1),
        name=tiny_model.name,
        source=tiny_model.source,
        meaningful_ppl=False,
    )
    with_bos = sliding_window_perplexity(
        tiny_model_with_bos, SAMPLE, max_length=16, stride=8, show_progress=False
    )
    assert with_bos.prepends_bos and "one BOS before the text" in with_bos.protocol
    assert (
        with_bos.num_tokens == plain.num_tokens + 1
        and with_bos.num_tokens_scored == plain.num_tokens_scored + 1
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(max_length=16, stride=17), "stride must be in"),
        (dict(max_length=16, stride=0), "stride must be in"),
        (dict(max_length=1), "max_length must be >= 2"),
        (dict(max_length=513), "exceeds the model context of 512"),
        (dict(max_tokens=1), "max_tokens must be >= 2"),
    ],
)
def test_invalid_settings_raise_config_error(tiny_model, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        sliding_window_perplexity(tiny_model, SAMPLE, show_progress=False, **kwargs)


def test_text_of_one_token_is_rejected(tiny_model):
    with pytest.raises(ConfigError, match="at least 2"):
        sliding_window_perplexity(tiny_model, "a", show_progress=False)


@pytest.mark.integration
def test_smollm2_wikitext2_matches_the_guide_recipe(smollm2):
    """Real weights, real data: the guide's recipe written out independently gives the same PPL."""
    max_tokens, max_length, stride = 768, 256, 128
    text = load_text("wikitext2")
    result = sliding_window_perplexity(
        smollm2, text, max_length=max_length, stride=stride, max_tokens=max_tokens, show_progress=False
    )
    # The guide tokenizes the whole corpus with default special tokens, then slides over it.
    ids = smollm2.tokenizer(text.text, return_tensors="pt").input_ids[0][:max_tokens]
    reference = guide_snippet_ppl(smollm2.model, ids, max_length, stride)
    assert result.is_meaningful and result.num_windows == 5 and result.num_tokens_scored == max_tokens - 1
    assert abs(result.guide_ppl - reference) < 0.005, (result.guide_ppl, reference)
    # The exact count and the guide's (trg_len - 1) weighting differ by O(1/stride) relative
    # (here 25.544 vs 25.566).
    assert result.ppl == pytest.approx(reference, rel=2 / stride)
    assert 5 < result.ppl < 100
