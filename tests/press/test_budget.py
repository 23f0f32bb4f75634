"""The one budget object: kvpress' floor for a ratio, per-layer budgets whose mean is the request,
the press's minimum checked before anything runs, and PressCache / engine / bench agreeing on it."""

import pytest
import torch

from kvlab.engine.compression import RequestPress
from kvlab.errors import ConfigError
from kvlab.generate import generate
from kvlab.press import get_press, list_presses
from kvlab.press.budget import Budget
from kvlab.press.hf import PressCache


@pytest.mark.parametrize(
    "n, ratio, kept",
    [(10, 0.25, 7), (10, 0.3, 7), (40, 0.5, 20), (7, 0.9, 1), (3, 0.5, 1), (1000, 0.25, 750), (99, 0.0, 99)],
)
def test_ratio_keeps_kvpress_floor_at_least_one(n, ratio, kept):
    """kvpress keeps int(n * (1 - r)); kvlab kept ceil(...) (8 of 10 at r=0.25; 2 of 3 at r=0.5)."""
    assert Budget(compression_ratio=ratio).tokens(n) == kept == max(1, int(n * (1 - ratio)))


def test_press_cache_keeps_the_floor_of_the_ratio(tiny_model):
    model, n = tiny_model.model, 10
    cache = PressCache(get_press("knorm"), model, compression_ratio=0.25)
    torch.manual_seed(0)
    generate(model, torch.randint(10, 49000, (1, n)), 1, cache=cache)
    assert [layer.get_seq_length() for layer in cache.layers] == [7] * len(cache.layers)


@pytest.mark.parametrize(
    "n, ratio, num_layers, window",
    [(1000, 0.25, 30, 32), (1000, 0.5, 30, 32), (500, 0.1, 24, 64), (4000, 0.5, 30, 64), (300, 0.7, 6, 8)],
)
def test_pyramidkv_mean_over_layers_is_the_request_even_when_layers_clip(n, ratio, num_layers, window):
    """n=1000, 30 layers, r=0.25: the paper's linear schedule asks 1462 of the bottom layer; clipping
    it at n (and the top at window + 1) without redistribution kept 670 on average instead of 750."""
    press = get_press("pyramidkv", window=window)
    budget = Budget(compression_ratio=ratio)
    budgets = budget.layers(press, num_layers, n)
    assert sum(budgets) == budget.tokens(n) * num_layers
    assert all(window + 1 <= b <= n for b in budgets)
    assert list(budgets) == sorted(budgets, reverse=True)  # still a pyramid
    assert budgets[0] > budgets[-1]


def test_pyramidkv_unclipped_follows_the_paper_schedule():
    press = get_press("pyramidkv", window=4, beta=4)
    budgets = Budget(max_cache_tokens=100).layers(press, 6, 10_000)
    assert budgets == (175, 145, 115, 85, 55, 25)  # Eq. 6-7: k / beta at the top, 2k - k / beta at the bottom


def test_pyramidkv_redistributes_what_the_window_floor_takes():
    press = get_press("pyramidkv", window=32)  # beta 20: the top layer would keep 5 < 33
    budgets = Budget(max_cache_tokens=100).layers(press, 6, 10_000)
    assert budgets[-1] == 33 and sum(budgets) == 600


def test_a_uniform_press_keeps_the_same_budget_in_every_layer_even_past_n():
    # A ring fills its budget during decode, so a budget above the prompt is not clipped to it.
    assert Budget(max_cache_tokens=64).layers(get_press("streaming_llm"), 4, 10) == (64,) * 4


@pytest.mark.parametrize(
    "press, minimum",
    [
        (get_press("snapkv", window=8), 9),
        (get_press("pyramidkv", window=8), 9),
        (get_press("streaming_llm", n_sink=4), 5),
        (get_press("knorm"), 1),
        (get_press("snapkv", window=8, per_head=True), 9),
    ],
)
def test_min_budget_is_checked_when_the_budget_is_resolved(press, minimum):
    assert press.min_budget() == minimum
    budget = Budget(max_cache_tokens=minimum)
    assert set(budget.layers(press, 4, 100)) >= {minimum} or press.layer_weights(4) is not None
    if minimum > 1:
        with pytest.raises(
            ConfigError, match=f"budget of {minimum - 1} tokens is too small.*at least {minimum}"
        ):
            Budget(max_cache_tokens=minimum - 1).layers(press, 4, 100)


def test_a_prefill_press_within_budget_never_runs_so_any_budget_is_fine():
    # 20 prompt tokens under a budget of 30: SnapKV never compresses, its window of 32 does not matter.
    assert Budget(max_cache_tokens=30).layers(get_press("snapkv"), 2, 20) == (30, 30)


def test_a_ring_budget_below_its_sinks_is_refused_even_for_a_short_prompt():
    with pytest.raises(ConfigError, match="streaming_llm|StreamingLLM"):
        Budget(max_cache_tokens=4).layers(get_press("streaming_llm", n_sink=4), 2, 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one"),
        ({"max_cache_tokens": 8, "compression_ratio": 0.5}, "exactly one"),
        ({"max_cache_tokens": 0}, "max_cache_tokens"),
        ({"max_cache_tokens": True}, "max_cache_tokens"),
        ({"max_cache_tokens": 2.5}, "max_cache_tokens"),
        ({"compression_ratio": 1.0}, r"\[0, 1\)"),
        ({"compression_ratio": -0.1}, r"\[0, 1\)"),
    ],
)
def test_bad_budgets_name_the_value_and_the_range(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Budget(**kwargs)


@pytest.mark.parametrize("name", list_presses())
def test_press_cache_and_engine_resolve_the_same_budget(tiny_model, name):
    """The engine's RequestPress and PressCache go through the same object: equal counts, or the
    engine refuses the press (different budgets per layer / decode evictions by score)."""
    press = get_press(name, window=4) if name in ("snapkv", "pyramidkv") else get_press(name)
    cache = PressCache(press, tiny_model.model, compression_ratio=0.3)
    hf = [cache.layer_budget(i, 37) for i in range(len(cache.layers))]
    try:
        engine_budget = RequestPress(press, compression_ratio=0.3).budget(37, len(cache.layers))
    except ConfigError:
        assert len(set(hf)) > 1 or press.evicts_during_decode
        return
    assert hf == [engine_budget] * len(cache.layers) == [int(37 * 0.7)] * len(cache.layers)


def test_per_head_budgets_share_the_layer_total_above_a_floor():
    assert Budget.heads(20, 4, 0.2) == (4, 80)
    assert Budget.heads(7, 2, 0.0) == (0, 14)


def test_key_rerotation_and_per_head_budgets_do_not_combine():
    # Under per-head budgets a head's slots include masked ones, which re-rotation would rank among
    # the kept keys (gaps in the positions it promises contiguous).
    from kvlab.errors import ConfigError
    from kvlab.press import get_press

    with pytest.raises(ConfigError, match="do not combine"):
        get_press("knorm", rerotate=True, per_head=True)
