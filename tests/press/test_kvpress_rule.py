"""`rule="kvpress"`: SnapKV / PyramidKV select as NVIDIA kvpress 0.5 does.

The references below are written out from kvpress 0.5.5's rule, in its order of operations: per query
head, the last `window` queries' softmax rows are averaged, the prefix is average-pooled (zero padding
counted in the divisor), the pooled rows are averaged over the heads of each kv-head's group, and the
window is always kept. PyramidKV's budgets follow kvpress' `get_layer_budget`, computed from n and the
compression ratio as kvpress does (not from kvlab's average budget).
"""

import math

import pytest
import torch

from kvlab.errors import ConfigError
from kvlab.press import get_press
from kvlab.press.base import Observations
from kvlab.press.budget import Budget
from kvlab.press.registry import press_options

B, KV_HEADS, Q_HEADS, N, D = 2, 2, 6, 40, 8
GROUPS = Q_HEADS // KV_HEADS
SCALE = D**-0.5


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(B, KV_HEADS, N, D, generator=g) * 1.5
    values = torch.randn(B, KV_HEADS, N, D, generator=g)
    queries = torch.randn(B, Q_HEADS, N, D, generator=g) * 1.5
    positions = torch.arange(N).expand(B, KV_HEADS, N)
    return keys, values, queries, positions


def softmax_row(q, keys_head, upto):
    logits = [float(q @ keys_head[j]) * SCALE for j in range(upto + 1)]
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    return [e / sum(exps) for e in exps] + [0.0] * (keys_head.shape[0] - upto - 1)


def kvpress_prefix_scores(keys, queries, window, kernel, b, h):
    """kvpress 0.5 SnapKV score of each prefix token of kv-head h (the window is kept regardless)."""
    prefix = N - window
    group_mean = [0.0] * prefix
    for qh in range(h * GROUPS, (h + 1) * GROUPS):
        rows = [softmax_row(queries[b, qh, i], keys[b, h], i) for i in range(N - window, N)]
        mean = [sum(row[j] for row in rows) / window for j in range(prefix)]
        half = kernel // 2
        pooled = [sum(mean[max(0, j - half) : min(prefix, j + half + 1)]) / kernel for j in range(prefix)]
        group_mean = [a + p / GROUPS for a, p in zip(group_mean, pooled, strict=True)]
    return group_mean


def kvpress_kept(keys, queries, window, kernel, budget, b, h):
    scores = kvpress_prefix_scores(keys, queries, window, kernel, b, h)
    best = sorted(range(N - window), key=lambda j: -scores[j])[: budget - window]
    return sorted(best + list(range(N - window, N))), scores


def keep(press, keys, values, queries, positions, budget, layer_idx=0):
    obs = Observations(positions=positions, num_new=N, queries=queries, scaling=SCALE)
    return press.keep(layer_idx, keys, values, obs, budget).indices


def assert_same_or_tied(kept, expected, scores, window):
    """Equal sets, or a swap between two prefix tokens whose scores tie to float32 precision."""
    if kept == expected:
        return
    swapped = set(kept) ^ set(expected)
    values = [scores[j] for j in swapped if j < N - window]
    assert max(values) - min(values) < 1e-6, (kept, expected)


@pytest.mark.parametrize(("window", "kernel", "budget"), [(4, 5, 14), (8, 3, 20), (6, 7, 12), (5, 1, 9)])
def test_snapkv_kvpress_rule_matches_the_kvpress_scorer(inputs, window, kernel, budget):
    keys, values, queries, positions = inputs
    press = get_press("snapkv", window=window, kernel=kernel, rule="kvpress")
    kept = keep(press, keys, values, queries, positions, budget)
    for b in range(B):
        for h in range(KV_HEADS):
            expected, scores = kvpress_kept(keys, queries, window, kernel, budget, b, h)
            assert_same_or_tied(kept[b, h].tolist(), expected, scores, window)


def test_kvpress_and_paper_rules_select_differently(inputs):
    """Max pooling (paper) and average pooling (kvpress) disagree somewhere on random data, so the
    test above could not pass with the paper's rule."""
    keys, values, queries, positions = inputs
    paper = keep(get_press("snapkv", window=4, kernel=5), keys, values, queries, positions, 14)
    kvpress = keep(
        get_press("snapkv", window=4, kernel=5, rule="kvpress"), keys, values, queries, positions, 14
    )
    assert not torch.equal(paper, kvpress)
    for b in range(B):
        for h in range(KV_HEADS):
            expected, _ = kvpress_kept(keys, queries, 4, 5, 14, b, h)
            assert kvpress[b, h].tolist() == expected


def kvpress_layer_budget(layer_idx, num_layers, n, ratio, window, beta):
    """kvpress 0.5 `PyramidKVPress.get_layer_budget`, in its own terms (q_len, compression ratio)."""
    capacity = window + n * (1 - ratio)
    min_num = (capacity - window) / beta
    max_num = (capacity - window) * 2 - min_num
    if max_num >= n - window:
        max_num = n - window
        min_num = (capacity - window) * 2 - max_num
    if not (n >= max_num >= min_num >= window):
        return max(1, round(n * (1 - ratio)))
    return round(max_num - layer_idx * (max_num - min_num) / (num_layers - 1))


@pytest.mark.parametrize(
    ("n", "ratio", "num_layers", "window", "beta"),
    [
        (1536, 0.5, 30, 64, 20),  # the bottom layer clips at n - window; the top keeps the window
        (4000, 0.5, 30, 64, 20),  # no clip
        (1000, 0.25, 30, 64, 20),  # clipped
        (1000, 0.75, 24, 32, 5),
        (200, 0.6, 12, 64, 20),  # top below the window: every layer keeps k (SnapKV)
        (800, 0.5, 7, 16, 2.5),
    ],
)
def test_pyramidkv_kvpress_budgets_match_kvpress(n, ratio, num_layers, window, beta):
    press = get_press("pyramidkv", window=window, beta=beta, rule="kvpress")
    average = int(n * (1 - ratio))
    assert average == n * (1 - ratio)  # kvpress' float average is an integer in these cases
    budgets = [press.layer_budget(layer, num_layers, average, num_tokens=n) for layer in range(num_layers)]
    expected = [
        kvpress_layer_budget(layer, num_layers, n, ratio, window, beta) for layer in range(num_layers)
    ]
    assert budgets == expected
    assert sum(budgets) / num_layers == pytest.approx(average, abs=1)


@pytest.mark.parametrize(
    ("n", "ratio", "num_layers", "window", "beta"),
    [
        (1535, 0.5, 30, 64, 20),  # average 767.5
        (147, 0.6, 12, 32, 20),  # SnapKV fallback: kvpress rounds 58.8 to 59 (its SnapKV keeps int: 58)
        (1000, 0.8, 24, 32, 5),  # 1000 * (1 - 0.8) = 199.99999999999997 in floating point
    ],
)
def test_pyramidkv_kvpress_budgets_from_a_ratio_use_the_unrounded_average(n, ratio, num_layers, window, beta):
    press = get_press("pyramidkv", window=window, beta=beta, rule="kvpress")
    budgets = Budget(compression_ratio=ratio).layers(press, num_layers, n)
    expected = [
        kvpress_layer_budget(layer, num_layers, n, ratio, window, beta) for layer in range(num_layers)
    ]
    assert list(budgets) == expected


def test_pyramidkv_rules_differ_where_kvpress_clips():
    """At n=1536, ratio 0.5 the paper rule's bottom layer asks for more than n - window."""
    paper = get_press("pyramidkv", window=64)
    kvpress = get_press("pyramidkv", window=64, rule="kvpress")
    assert paper.layer_budget(0, 30, 768) > 1536 - 64  # no clip at n - window (kvlab.press.budget)
    assert kvpress.layer_budget(0, 30, 768, num_tokens=1536) == 1472
    assert kvpress.layer_budget(29, 30, 768, num_tokens=1536) == 64


def test_pyramidkv_kvpress_layer_keeps_the_snapkv_kvpress_set(inputs):
    keys, values, queries, positions = inputs
    press = get_press("pyramidkv", window=4, kernel=3, beta=2, rule="kvpress")
    budget = press.layer_budget(1, 2, 16, num_tokens=N)
    assert budget == 8
    kept = keep(press, keys, values, queries, positions, budget, layer_idx=1)
    for b in range(B):
        for h in range(KV_HEADS):
            expected, scores = kvpress_kept(keys, queries, 4, 3, budget, b, h)
            assert_same_or_tied(kept[b, h].tolist(), expected, scores, 4)


def test_kvpress_rule_may_keep_exactly_the_window(inputs):
    keys, values, queries, positions = inputs
    kept = keep(get_press("snapkv", window=6, rule="kvpress"), keys, values, queries, positions, 6)
    assert kept.tolist() == [[list(range(N - 6, N))] * KV_HEADS] * B
    with pytest.raises(ConfigError, match="at least 7"):
        keep(get_press("snapkv", window=6), keys, values, queries, positions, 6)
    with pytest.raises(ConfigError, match="at least 6"):
        keep(get_press("snapkv", window=6, rule="kvpress"), keys, values, queries, positions, 5)


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv"])
def test_rule_is_an_option_and_bad_rules_are_refused(name):
    assert press_options(name)["rule"] == "paper"
    assert get_press(name).rule == "paper"
    assert get_press(name, rule="kvpress").rule == "kvpress"
    with pytest.raises(ConfigError, match=r"paper, kvpress.*'max'"):
        get_press(name, rule="max")
