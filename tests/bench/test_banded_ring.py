"""Streaming PPL of a StreamingLLM ring scored in chunks (kvlab/bench/eval/banded_ring.py) equals the
token-by-token ring's, NLL for NLL: before and after the ring fills, across chunk boundaries, with
and without sinks and re-rotation, on both architectures."""

import pytest
import torch

from kvlab.bench.eval import banded_ring
from kvlab.bench.eval.streaming_ppl import streaming_ppl
from kvlab.errors import ConfigError
from kvlab.press.streaming_llm import StreamingLLMPress
from kvlab.press.wrappers import KeyRerotationPress


@pytest.fixture
def text_ids():
    return torch.randint(10, 49000, (70,), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("config", ["streaming_llm", "window"])
def test_chunks_give_the_token_by_token_nlls(tiny_model, text_ids, config, monkeypatch):
    monkeypatch.setattr(banded_ring, "CHUNK_TOKENS", 7)  # 70 tokens: chunks straddle the ring filling at 16
    banded = streaming_ppl(tiny_model.model, text_ids, config, max_cache_tokens=16)
    stepwise = streaming_ppl(tiny_model.model, text_ids, config, max_cache_tokens=16, path="native")
    assert (banded.path, stepwise.path) == ("native-banded", "native")
    torch.testing.assert_close(banded.nll, stepwise.nll, atol=1e-4, rtol=1e-4)
    assert banded.kv_bytes == stepwise.kv_bytes
    # The ring matters: a full cache scores the tail differently.
    full = streaming_ppl(tiny_model.model, text_ids[:60], "full")
    assert not torch.allclose(banded.nll[:59], full.nll, atol=1e-2)


def test_sinks_at_true_positions_without_rerotation(tiny_model, text_ids):
    press = StreamingLLMPress(n_sink=4)
    banded = streaming_ppl(tiny_model.model, text_ids, press=press, max_cache_tokens=12, path="banded")
    stepwise = streaming_ppl(tiny_model.model, text_ids, press=press, max_cache_tokens=12, path="native")
    torch.testing.assert_close(banded.nll, stepwise.nll, atol=1e-4, rtol=1e-4)
    rerotated = streaming_ppl(
        tiny_model.model, text_ids, press=KeyRerotationPress(press), max_cache_tokens=12, path="banded"
    )
    assert not torch.allclose(rerotated.nll, banded.nll, atol=1e-3)


def test_banded_is_refused_for_presses_that_score_evictions(tiny_model, text_ids):
    with pytest.raises(ConfigError, match="path 'banded' needs a StreamingLLM ring"):
        streaming_ppl(tiny_model.model, text_ids, "h2o", max_cache_tokens=16, path="banded")
