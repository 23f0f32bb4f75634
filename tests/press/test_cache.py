"""PressCache on both tiny architectures: equivalence, budgets, real savings, scoped hooks."""

import pytest
import torch

from kvlab.cache import kv_cache_bytes
from kvlab.errors import ConfigError
from kvlab.generate import generate
from kvlab.press import get_press, list_presses
from kvlab.press.hf import PressCache

PROMPT, NEW = 12, 4


@pytest.fixture
def ids():
    torch.manual_seed(0)
    return torch.randint(10, 49000, (2, PROMPT))


def hf_greedy(model, input_ids, n, **kwargs):
    out = model.generate(
        input_ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **kwargs
    )
    return out[:, input_ids.shape[1] :]


def no_hooks_left(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def kv_shape(model):
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return kv_heads, head_dim


@pytest.mark.parametrize("name", list_presses())
def test_budget_over_sequence_equals_uncompressed_greedy(tiny_model, ids, name):
    model = tiny_model.model
    expected = hf_greedy(model, ids, NEW)
    # PyramidKV's top layer keeps budget / beta, so give it room for every layer to hold everything.
    budget = 20 * (PROMPT + NEW) if name == "pyramidkv" else PROMPT + NEW
    press = get_press(name)
    cache = PressCache(press, model, max_cache_tokens=budget)
    with cache.hooks(model):
        assert torch.equal(hf_greedy(model, ids, NEW, cache=cache), expected)
    cache = PressCache(press, model, max_cache_tokens=budget)
    with cache.hooks(model):
        assert torch.equal(generate(model, ids, NEW, cache=cache).tokens, expected)
    assert no_hooks_left(model)


@pytest.mark.parametrize("name", list_presses())
def test_cache_never_exceeds_budget_and_saving_is_physical(tiny_model, ids, name):
    model = tiny_model.model
    press = get_press(name, window=4) if name in ("snapkv", "pyramidkv") else get_press(name)
    budget = 10
    cache = PressCache(press, model, max_cache_tokens=budget)
    budgets = [cache.layer_budget(i, PROMPT) for i in range(len(cache.layers))]
    kv_heads, head_dim = kv_shape(model)
    slot_bytes = 2 * ids.shape[0] * kv_heads * head_dim * 4
    lengths = []

    def check(_token):
        lengths.append([layer.get_seq_length() for layer in cache.layers])

    with cache.hooks(model):
        generate(model, ids, NEW, cache=cache, on_token=check)
    for step, per_layer in enumerate(lengths):
        # prefill-time presses compress once, then decode appends; the others stay within budget
        allowed = budgets if press.evicts_during_decode else [min(b, PROMPT) + step for b in budgets]
        assert per_layer == allowed
    final = [layer.get_seq_length() for layer in cache.layers]
    stored = sum(final) if not press.evicts_during_decode else sum(budgets)
    assert kv_cache_bytes(cache) == stored * slot_bytes


def test_streaming_llm_matches_masked_full_attention(tiny_model):
    """Physical eviction gives the logits of full attention masked to sinks + window (no re-rotation)."""
    model = tiny_model.model
    torch.manual_seed(1)
    ids = torch.randint(10, 49000, (1, 30))
    n_sink, budget = 2, 8
    cache = PressCache(get_press("streaming_llm", n_sink=n_sink), model, max_cache_tokens=budget)
    streamed = []
    for t in range(ids.shape[1]):
        out = model(
            input_ids=ids[:, t : t + 1], position_ids=torch.tensor([[t]]), cache=cache, use_cache=True
        )
        streamed.append(out.logits[:, -1])
    n = ids.shape[1]
    visible = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(i + 1):
            # step i attends to itself and the budget - 1 tokens kept before it: sinks, then the most recent
            kept_before = list(range(min(n_sink, i))) + list(
                range(max(n_sink, i - (budget - 1 - min(n_sink, i))), i)
            )
            visible[i, j] = j == i or j in kept_before
    mask = torch.zeros(1, 1, n, n).masked_fill(~visible, torch.finfo(torch.float32).min)
    reference = model(input_ids=ids, attention_mask=mask).logits[0]
    # float32 rounding grows with the logits' scale (the context-sensitive tiny models reach ~100)
    scale = float(reference.detach().abs().max())
    torch.testing.assert_close(torch.cat(streamed), reference, atol=1e-5 * scale, rtol=1e-4)
    assert (
        kv_cache_bytes(cache)
        == 2 * model.config.num_hidden_layers * budget * kv_shape(model)[0] * kv_shape(model)[1] * 4
    )


def test_hooks_are_removed_even_on_error(tiny_model, ids):
    model = tiny_model.model
    cache = PressCache(get_press("snapkv", window=4), model, max_cache_tokens=8)
    with pytest.raises(RuntimeError, match="boom"):
        with cache.hooks(model):
            assert not no_hooks_left(model)
            raise RuntimeError("boom")
    assert no_hooks_left(model)


@pytest.mark.parametrize("press", [get_press("h2o"), get_press("knorm", per_head=True)])
def test_press_that_needs_hooks_without_them_is_a_clear_error(tiny_model, ids, press):
    cache = PressCache(press, tiny_model.model, max_cache_tokens=8)
    with pytest.raises(ConfigError, match="hooks"):
        generate(tiny_model.model, ids, 2, cache=cache)


def test_query_free_press_works_with_plain_generate(tiny_model, ids):
    model = tiny_model.model
    cache = PressCache(get_press("streaming_llm"), model, max_cache_tokens=12)
    out = hf_greedy(model, ids, NEW, cache=cache)
    assert out.shape == (2, NEW) and max(layer.get_seq_length() for layer in cache.layers) == 12


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"max_cache_tokens": 0},
        {"compression_ratio": 1.0},
        {"compression_ratio": -0.1},
        {"max_cache_tokens": 8, "compression_ratio": 0.5},
    ],
)
def test_bad_budgets_are_config_errors(tiny_model, kwargs):
    with pytest.raises(ConfigError):
        PressCache(get_press("knorm"), tiny_model.model, **kwargs)


def test_bad_press_options_are_config_errors(tiny_model, ids):
    with pytest.raises(ConfigError, match="no option"):
        get_press("snapkv", windw=4)
    with pytest.raises(ConfigError, match="unknown press"):
        get_press("nope")
    with pytest.raises(ConfigError):
        get_press("snapkv", kernel=4)
    cache = PressCache(get_press("streaming_llm", n_sink=4), tiny_model.model, max_cache_tokens=4)
    with pytest.raises(ConfigError, match="too small"):
        generate(tiny_model.model, ids, 2, cache=cache)


def test_per_head_padding_slots_are_masked_out(tiny_model, ids):
    """Heads that keep fewer tokens are padded; garbage in the padding must not change the logits."""
    model = tiny_model.model
    press = get_press("knorm", per_head=True)
    press.alpha = 0.0
    logits = []
    for garbage in (False, True):
        cache = PressCache(press, model, max_cache_tokens=6)
        with cache.hooks(model):
            model(input_ids=ids, cache=cache, use_cache=True)
            assert any(not bool(layer.valid.all()) for layer in cache.layers)
            if garbage:
                for layer in cache.layers:
                    pad = ~layer.valid[..., None].expand_as(layer.keys)
                    layer.keys[pad], layer.values[pad] = 1e4, -1e4
            position = torch.full((ids.shape[0], 1), PROMPT)
            out = model(input_ids=ids[:, :1], position_ids=position, cache=cache, use_cache=True)
        logits.append(out.logits)
    torch.testing.assert_close(logits[0], logits[1])


def test_rerotation_keeps_cache_positions_contiguous_up_to_the_newest(tiny_model):
    from kvlab.press.wrappers import rotate_keys_

    model = tiny_model.model
    torch.manual_seed(3)
    ids = torch.randint(10, 49000, (1, 20))
    caches = [
        PressCache(get_press("streaming_llm", n_sink=2, rerotate=r), model, max_cache_tokens=8)
        for r in (0, 1)
    ]
    for cache in caches:
        for t in range(ids.shape[1]):
            model(input_ids=ids[:, t : t + 1], position_ids=torch.tensor([[t]]), cache=cache, use_cache=True)
    plain, moved = caches[0].layers[0], caches[1].layers[0]
    assert sorted(moved.positions[0, 0].tolist()) == list(range(12, 20))
    assert sorted(plain.positions[0, 0].tolist()) == [0, 1, *range(14, 20)]
    # Layer 0 keys depend only on the token and its position, so re-rotation must equal rotating them.
    expected = rotate_keys_(plain.keys.clone(), moved.positions - plain.positions, caches[0].adapter.rotary)
    torch.testing.assert_close(moved.keys, expected, atol=1e-5, rtol=1e-5)
