"""Each press's kept set equals a plain, independent reference of its paper's scoring rule."""

import math

import pytest
import torch

from kvlab.models.adapters import apply_rotary
from kvlab.press import get_press
from kvlab.press.base import Observations, RotarySpec, received_attention
from kvlab.press.budget import Budget
from kvlab.press.wrappers import rotate_keys_

B, KV_HEADS, Q_HEADS, N, D = 2, 2, 4, 24, 8
SCALE = D**-0.5


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(B, KV_HEADS, N, D, generator=g)
    values = torch.randn(B, KV_HEADS, N, D, generator=g)
    queries = torch.randn(B, Q_HEADS, N, D, generator=g)  # a full prefill: one query per token
    positions = torch.arange(N).expand(B, KV_HEADS, N)
    return keys, values, queries, positions


def observations(queries, positions, num_new=N):
    return Observations(positions=positions, num_new=num_new, queries=queries, scaling=SCALE)


def run_keep(press, keys, values, obs, budget, layer_idx=0):
    if press.needs_queries:
        obs.state = press.update_state(layer_idx, keys, obs)
    return press.keep(layer_idx, keys, values, obs, budget).indices


def attention_row(q, keys_head, upto):
    """softmax of one query over keys 0..upto (inclusive), written out explicitly."""
    logits = [float(q @ keys_head[j]) * SCALE for j in range(upto + 1)]
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    total = sum(exps)
    return [e / total for e in exps] + [0.0] * (keys_head.shape[0] - upto - 1)


def group_heads(kv_head):
    groups = Q_HEADS // KV_HEADS
    return range(kv_head * groups, (kv_head + 1) * groups)


def top_set(scores, k, always=()):
    """Indices of `always` plus the k - len(always) best other scores."""
    rest = sorted((i for i in range(len(scores)) if i not in always), key=lambda i: -scores[i])
    return sorted(set(always) | set(rest[: k - len(always)]))


def as_sets(indices):
    return [
        [sorted(indices[b, h].tolist()) for h in range(indices.shape[1])] for b in range(indices.shape[0])
    ]


@pytest.mark.parametrize("n_sink", [0, 4])
def test_streaming_llm_keeps_sinks_and_window(inputs, n_sink):
    keys, values, queries, positions = inputs
    kept = run_keep(
        get_press("streaming_llm", n_sink=n_sink), keys, values, observations(None, positions), 10
    )
    expected = sorted(set(range(n_sink)) | set(range(N - (10 - n_sink), N)))
    assert all(row == expected for rows in as_sets(kept) for row in rows)


def test_h2o_keeps_heavy_hitters_and_recent(inputs):
    keys, values, queries, positions = inputs
    budget = 10
    kept = run_keep(get_press("h2o"), keys, values, observations(queries, positions), budget)
    for b in range(B):
        for h in range(KV_HEADS):
            received = [0.0] * N
            for qh in group_heads(h):
                for i in range(N):
                    row = attention_row(queries[b, qh, i], keys[b, h], i)
                    received = [r + w / (Q_HEADS // KV_HEADS) for r, w in zip(received, row, strict=True)]
            recent = list(range(N - budget // 2, N))
            assert sorted(kept[b, h].tolist()) == top_set(received, budget, always=recent)


def test_tova_keeps_top_last_query_attention_shared_by_heads(inputs):
    keys, values, queries, positions = inputs
    kept = run_keep(get_press("tova"), keys, values, observations(queries, positions), 9)
    for b in range(B):
        mean = [0.0] * N
        for h in range(KV_HEADS):
            for qh in group_heads(h):
                row = attention_row(queries[b, qh, -1], keys[b, h], N - 1)
                mean = [m + w / Q_HEADS for m, w in zip(mean, row, strict=True)]
        for h in range(KV_HEADS):
            assert sorted(kept[b, h].tolist()) == top_set(mean, 9)


def snapkv_reference(keys, queries, window, kernel, b, h):
    """SnapKV votes of the prefix tokens: window queries' attention, group-averaged, max-pooled."""
    votes = [0.0] * N
    for qh in group_heads(h):
        for i in range(N - window, N):
            row = attention_row(queries[b, qh, i], keys[b, h], i)
            votes = [v + w / (Q_HEADS // KV_HEADS) for v, w in zip(votes, row, strict=True)]
    prefix = N - window
    pooled = [max(votes[max(0, j - kernel // 2) : min(prefix, j + kernel // 2 + 1)]) for j in range(prefix)]
    return pooled


def assert_top_set(kept, scores, budget, always):
    """kept = always + a top-(budget - |always|) set of the other scores (ties, common after max
    pooling, may be broken either way)."""
    kept = set(kept)
    assert len(kept) == budget and set(always) <= kept
    others = [j for j in range(len(scores)) if j not in always]
    chosen = [scores[j] for j in others if j in kept]
    dropped = [scores[j] for j in others if j not in kept]
    assert not dropped or min(chosen) >= max(dropped)


def test_snapkv_keeps_window_and_pooled_votes(inputs):
    keys, values, queries, positions = inputs
    press = get_press("snapkv", window=4, kernel=3)
    kept = run_keep(press, keys, values, observations(queries, positions), 11)
    for b in range(B):
        for h in range(KV_HEADS):
            pooled = snapkv_reference(keys, queries, 4, 3, b, h)
            assert_top_set(kept[b, h].tolist(), pooled, 11, always=range(N - 4, N))


def test_pyramidkv_budgets_shrink_with_depth_and_average_out():
    press = get_press("pyramidkv", window=4, beta=4)
    budgets = Budget(max_cache_tokens=100).layers(press, 6, 1000)
    assert list(budgets) == sorted(budgets, reverse=True) and budgets[-1] == 25 and budgets[0] == 175
    assert sum(budgets) == 600


def test_pyramidkv_layer_keeps_snapkv_set_at_its_budget(inputs):
    keys, values, queries, positions = inputs
    press = get_press("pyramidkv", window=4, kernel=3, beta=2)
    budget = Budget(max_cache_tokens=12).for_layer(press, 1, 2, N)  # top layer: 12 / beta
    kept = run_keep(press, keys, values, observations(queries, positions), budget, layer_idx=1)
    assert budget == 6
    for b in range(B):
        for h in range(KV_HEADS):
            pooled = snapkv_reference(keys, queries, 4, 3, b, h)
            assert_top_set(kept[b, h].tolist(), pooled, 6, always=range(N - 4, N))


def test_knorm_keeps_lowest_key_norms(inputs):
    keys, values, queries, positions = inputs
    kept = run_keep(get_press("knorm"), keys, values, observations(None, positions), 7)
    for b in range(B):
        for h in range(KV_HEADS):
            norms = [math.sqrt(sum(float(x) ** 2 for x in keys[b, h, j])) for j in range(N)]
            assert sorted(kept[b, h].tolist()) == sorted(sorted(range(N), key=lambda j: norms[j])[:7])


def test_random_is_seeded_and_varies_with_seed(inputs):
    keys, values, queries, positions = inputs
    obs = observations(None, positions)
    a = run_keep(get_press("random", seed=1), keys, values, obs, 8)
    assert torch.equal(a, run_keep(get_press("random", seed=1), keys, values, obs, 8))
    assert not torch.equal(a, run_keep(get_press("random", seed=2), keys, values, obs, 8))
    assert all(len(set(row)) == 8 for rows in as_sets(a) for row in rows)


def test_per_head_budgets_follow_global_top_with_floor(inputs):
    keys, values, queries, positions = inputs
    budget, alpha = 8, 0.25
    press = get_press("knorm", per_head=True)
    press.alpha = alpha
    selection = press.keep(0, keys, values, observations(None, positions), budget)
    for b in range(B):
        scores = {(h, j): -float(keys[b, h, j].norm()) for h in range(KV_HEADS) for j in range(N)}
        floor = int(alpha * budget)
        chosen = set()
        for h in range(KV_HEADS):
            chosen |= {(h, j) for j in sorted(range(N), key=lambda j: -scores[(h, j)])[:floor]}
        rest = sorted((k for k in scores if k not in chosen), key=lambda k: -scores[k])
        chosen |= set(rest[: budget * KV_HEADS - len(chosen)])
        for h in range(KV_HEADS):
            got = selection.indices[b, h][selection.valid[b, h]].tolist()
            assert sorted(got) == sorted(j for (hh, j) in chosen if hh == h)
        assert int(selection.valid[b].sum()) == budget * KV_HEADS


def test_evict_slot_drops_what_keep_drops(inputs):
    keys, values, queries, positions = inputs
    for name in ("h2o", "tova"):
        press = get_press(name)
        obs = observations(queries[:, :, -1:], positions, num_new=1)
        obs.state = press.update_state(0, keys, obs)
        slot = press.evict_slot(0, keys, values, obs, N - 1)
        kept = press.keep(0, keys, values, obs, N - 1).indices
        for b in range(B):
            for h in range(KV_HEADS):
                assert set(range(N)) - set(kept[b, h].tolist()) == {int(slot[b, h])}


def test_chunked_received_attention_equals_one_chunk(inputs):
    keys, values, queries, positions = inputs
    whole = received_attention(queries[:, :, -10:], keys, SCALE, chunk=256)
    torch.testing.assert_close(received_attention(queries[:, :, -10:], keys, SCALE, chunk=3), whole)


def test_rerotated_keys_equal_keys_rotated_at_the_new_position():
    g = torch.Generator().manual_seed(3)
    raw = torch.randn(1, 2, 5, 16, generator=g)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))  # partial rotary: 8 of 16 channels
    spec = RotarySpec(inv_freq=inv_freq, rotary_dim=8)

    def rope(x, pos):
        angles = pos[:, None].float() * inv_freq
        emb = torch.cat((angles, angles), -1)[None]
        return apply_rotary(x, emb.cos(), emb.sin())

    old, new = torch.tensor([3, 9, 40, 41, 700]), torch.tensor([0, 1, 2, 3, 4])
    moved = rotate_keys_(rope(raw, old), (new - old).expand(1, 2, 5), spec)
    torch.testing.assert_close(moved, rope(raw, new), atol=1e-4, rtol=1e-4)
