"""Streaming and compressed-context perplexity protocols on the tiny models (tiny texts, tiny budgets)."""

import math

import pytest
import torch

from kvlab.bench.eval.streaming_ppl import RECOMPUTE, STREAMING_CONFIGS, compressed_context_ppl, streaming_ppl
from kvlab.errors import ConfigError
from kvlab.press import get_press


@pytest.fixture
def text_ids():
    torch.manual_seed(2)
    return torch.randint(10, 49000, (20,))


def test_every_configuration_equals_full_when_the_budget_holds_the_text(tiny_model, text_ids):
    model = tiny_model.model
    full = streaming_ppl(model, text_ids, "full")
    assert full.nll.shape == (19,) and full.first_scored == 1
    for config in STREAMING_CONFIGS:
        result = streaming_ppl(model, text_ids, config, max_cache_tokens=32)
        torch.testing.assert_close(result.nll, full.nll, atol=1e-4, rtol=1e-5)
    cumulative = full.cumulative_ppl()
    assert cumulative[-1].item() == pytest.approx(full.ppl) and cumulative[0].item() == pytest.approx(
        math.exp(full.nll[0])
    )


def test_streaming_past_the_budget_stays_finite_at_budget_size(tiny_model, text_ids):
    model = tiny_model.model
    budget = 8
    results = {
        c: streaming_ppl(model, text_ids, c, max_cache_tokens=budget)
        for c in ("streaming_llm", "window", "h2o", "tova", RECOMPUTE)
    }
    assert all(torch.isfinite(r.nll).all() for r in results.values())
    kv_per_token = results["streaming_llm"].kv_bytes // budget
    assert results["window"].kv_bytes == results["h2o"].kv_bytes == kv_per_token * budget


def test_recompute_scored_from_a_later_token_is_the_tail_of_the_whole_run(tiny_model, text_ids):
    whole = streaming_ppl(tiny_model.model, text_ids, RECOMPUTE, max_cache_tokens=6)
    tail = streaming_ppl(tiny_model.model, text_ids, RECOMPUTE, max_cache_tokens=6, score_from=13)
    assert tail.first_scored == 13 and tail.nll.shape == (7,)
    torch.testing.assert_close(tail.nll, whole.tail(13), atol=1e-6, rtol=1e-6)
    assert whole.tail(13).shape == (7,) and whole.tail(0).shape == whole.nll.shape
    with pytest.raises(ConfigError, match="score_from"):
        streaming_ppl(tiny_model.model, text_ids, RECOMPUTE, score_from=20)


def test_full_stops_at_the_model_context(tiny_model, text_ids, monkeypatch):
    monkeypatch.setattr(tiny_model.model.config, "max_position_embeddings", 12)
    assert streaming_ppl(tiny_model.model, text_ids, "full").nll.shape == (11,)


def test_compressed_context_ppl(tiny_model, text_ids):
    model = tiny_model.model
    base = compressed_context_ppl(model, text_ids, None, context_len=12)
    assert base.nll.shape == (8,) and base.first_scored == 12
    same = compressed_context_ppl(
        model, text_ids, get_press("snapkv", window=4), context_len=12, compression_ratio=0.0
    )
    torch.testing.assert_close(same.nll, base.nll, atol=1e-4, rtol=1e-5)
    for press in (
        get_press("pyramidkv", window=4),
        get_press("knorm", per_head=True),
        get_press("h2o", rerotate=True),
    ):
        half = compressed_context_ppl(model, text_ids, press, context_len=12, compression_ratio=0.5)
        assert torch.isfinite(half.nll).all() and half.kv_bytes < base.kv_bytes


def test_bad_arguments_are_config_errors(tiny_model, text_ids):
    with pytest.raises(ConfigError):
        streaming_ppl(tiny_model.model, text_ids, "nope")
    with pytest.raises(ConfigError, match="evicts during decode"):
        streaming_ppl(tiny_model.model, text_ids, "snapkv")
    with pytest.raises(ConfigError):
        compressed_context_ppl(tiny_model.model, text_ids, None, context_len=40)


def test_per_head_budgets_with_equal_split_match_the_plain_press(tiny_model, text_ids):
    """alpha=1 gives every head exactly the budget: the per-head mask path must change nothing."""
    per_head = get_press("knorm", per_head=True)
    per_head.alpha = 1.0
    args = dict(context_len=12, compression_ratio=0.5)
    plain = compressed_context_ppl(tiny_model.model, text_ids, get_press("knorm"), **args)
    torch.testing.assert_close(
        compressed_context_ppl(tiny_model.model, text_ids, per_head, **args).nll, plain.nll
    )


@pytest.mark.parametrize("config", ["full", "window", "streaming_llm"])
def test_native_streaming_equals_the_hf_path(tiny_model, config):
    """Token by token on the engine twin (ring of 12 slots, sinks re-rotated every step) scores every
    token as the HF modules with a PressCache do."""
    torch.manual_seed(4)
    ids = torch.randint(10, 49000, (50,))
    native = streaming_ppl(tiny_model.model, ids, config, max_cache_tokens=12, path="native")
    hf = streaming_ppl(tiny_model.model, ids, config, max_cache_tokens=12, path="hf")
    assert (native.path, hf.path) == ("native", "hf")
    torch.testing.assert_close(native.nll, hf.nll, atol=1e-4, rtol=1e-4)
    assert native.kv_bytes == hf.kv_bytes
    if config != "full":  # the budget bites: the press changed the scores
        full = streaming_ppl(tiny_model.model, ids, "full")
        assert (native.nll - full.nll).abs().max() > 1e-2


def test_presses_that_score_evictions_stream_on_the_hf_path(tiny_model, text_ids):
    assert streaming_ppl(tiny_model.model, text_ids, "h2o", max_cache_tokens=8).path == "hf"
    with pytest.raises(ConfigError, match="native path cannot run"):
        streaming_ppl(tiny_model.model, text_ids, "tova", max_cache_tokens=8, path="native")


@pytest.mark.integration
def test_smollm2_streaming_equals_the_hf_path_on_pg19(smollm2):
    from kvlab.bench.core.datasets import load_text
    from kvlab.bench.eval.perplexity import tokenize

    ids = tokenize(smollm2.tokenizer, load_text("pg19").text)[0][:160]
    native = streaming_ppl(smollm2.model, ids, "streaming_llm", max_cache_tokens=64)
    hf = streaming_ppl(smollm2.model, ids, "streaming_llm", max_cache_tokens=64, path="hf")
    assert native.path == "native-banded"  # scored in chunks (banded_ring.py); 160 tokens: one chunk
    torch.testing.assert_close(native.nll, hf.nll, atol=2e-3, rtol=1e-3)
    assert native.ppl == pytest.approx(hf.ppl, rel=1e-4)
