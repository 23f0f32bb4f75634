"""Presses on the native path (kvlab/native_press.py): same tokens and kept positions as the HF path
(`PressCache` on the HF modules), budget-sized buffers, and the HF path for what it cannot run."""

import pytest
import torch

from kvlab.errors import ConfigError
from kvlab.forward_paths import HFForward, NativeForward, select_forward
from kvlab.generate import generate
from kvlab.native_press import native_press_support
from kvlab.press.budget import Budget
from kvlab.press.registry import PRESSES, get_press

# Every registered press the native path runs, with and without key re-rotation; small windows so
# that a 40-token prompt at ratio 0.5 compresses (SnapKV needs budget >= window + 1).
OPTIONS = {"snapkv": {"window": 4}, "pyramidkv": {"window": 4}}
NATIVE = [name for name in PRESSES if native_press_support(get_press(name)) is None]
CASES = [(name, rerotate) for name in NATIVE for rerotate in (False, True)]


def press_of(name: str, rerotate: bool = False):
    return get_press(name, rerotate=rerotate, **OPTIONS.get(name, {}))


def budget_of(name: str) -> Budget:
    # A ring runs with a fixed size smaller than prompt + output: the prompt is compacted and every
    # decode step overwrites a slot (with re-rotation, the sinks move each step).
    return Budget(max_cache_tokens=16) if PRESSES[name].evicts_by_position else Budget(compression_ratio=0.5)


@pytest.fixture
def prompt():
    torch.manual_seed(0)
    return torch.randint(10, 49000, (1, 40))


def test_the_native_path_covers_prefill_time_presses_and_the_ring():
    assert set(NATIVE) == {"streaming_llm", "snapkv", "pyramidkv", "knorm", "random"}
    for name in ("h2o", "tova"):
        assert "decode eviction" in native_press_support(get_press(name))
    assert "plain presses" in native_press_support(get_press("snapkv", per_head=True))


@pytest.mark.parametrize("name, rerotate", CASES)
def test_greedy_output_equals_the_hf_path(tiny_model, prompt, name, rerotate):
    model, press, budget = tiny_model.model, press_of(name, rerotate), budget_of(name)
    native = generate(model, prompt, 30, press=press, budget=budget)
    hf = generate(model, prompt, 30, press=press, budget=budget, path="hf")
    assert (native.path, hf.path) == ("native", "hf")
    assert torch.equal(native.tokens, hf.tokens)
    assert native.cache_bytes == hf.cache_bytes  # both hold exactly what the press keeps
    # The press changed the output: the equality above compares compressed runs, not two full caches.
    assert not torch.equal(native.tokens, generate(model, prompt, 30).tokens)


def test_rerotation_changes_the_ring_output(tiny_model, prompt):
    """The sinks' re-rotation is exercised: the text decoded with it differs from true positions."""
    budget = Budget(max_cache_tokens=16)
    plain = generate(tiny_model.model, prompt, 30, press=press_of("streaming_llm"), budget=budget)
    moved = generate(tiny_model.model, prompt, 30, press=press_of("streaming_llm", True), budget=budget)
    assert not torch.equal(plain.tokens, moved.tokens)


@pytest.mark.parametrize("name", [n for n in NATIVE if not PRESSES[n].evicts_by_position])
def test_kept_positions_equal_the_press_cache(tiny_model, prompt, name):
    model, press, budget = tiny_model.model, press_of(name), budget_of(name)
    native = select_forward(
        model, prompt, 1, cache=None, attention_mask=None, path="native", press=press, budget=budget
    )
    hf = select_forward(
        model, prompt, 1, cache=None, attention_mask=None, path="hf", press=press, budget=budget
    )
    assert isinstance(native, NativeForward) and isinstance(hf, HFForward)
    native.prefill(prompt)
    with hf.hooks():
        hf.prefill(prompt)
    for layer, kept in enumerate(native.press_cache.kept_positions):
        assert torch.equal(kept[0], hf.cache.layers[layer].positions[0]), f"layer {layer}"
        assert kept[0].shape[-1] < prompt.shape[1]


@pytest.mark.parametrize("name", NATIVE)
def test_native_buffers_are_budget_sized(tiny_model, prompt, name):
    model, press, budget, new = tiny_model.model, press_of(name), budget_of(name), 10
    config = model.config
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layers = budget.layers(press, config.num_hidden_layers, prompt.shape[1])
    # A ring holds its budget; a prefill-time press what it keeps plus the decoded tokens.
    slots = layers if press.evicts_by_position else [b + new - 1 for b in layers]
    result = generate(model, prompt, new, press=press, budget=budget)
    assert result.path == "native"
    assert result.cache_bytes == sum(2 * kv_heads * head_dim * 4 * n for n in slots)
    full = generate(model, prompt, new).cache_bytes
    assert result.cache_bytes < 0.6 * full


def test_presses_the_native_path_cannot_run_take_the_hf_path(tiny_model, prompt):
    model, budget = tiny_model.model, Budget(max_cache_tokens=16)
    for press in (get_press("h2o"), get_press("tova"), get_press("knorm", per_head=True)):
        assert generate(model, prompt, 3, press=press, budget=budget).path == "hf"
        with pytest.raises(ConfigError, match="native path cannot run"):
            generate(model, prompt, 3, press=press, budget=budget, path="native")


def test_press_arguments_are_checked(tiny_model, prompt):
    model = tiny_model.model
    with pytest.raises(ConfigError, match="needs a budget"):
        generate(model, prompt, 3, press=get_press("knorm"))
    with pytest.raises(ConfigError, match="needs a press"):
        generate(model, prompt, 3, budget=Budget(max_cache_tokens=8))
    with pytest.raises(ConfigError, match="not both"):
        generate(
            model, prompt, 3, press=get_press("knorm"), budget=Budget(max_cache_tokens=8), cache=object()
        )
    # A budget the press cannot run fails before anything runs, on either path.
    for path in ("auto", "hf"):
        with pytest.raises(ConfigError, match="too small"):
            generate(model, prompt, 3, press=press_of("snapkv"), budget=Budget(max_cache_tokens=3), path=path)


def test_left_padded_rows_equal_each_row_alone(tiny_model):
    """Each row keeps its own budget of its own real tokens, at its own positions."""
    torch.manual_seed(3)
    ids = torch.randint(10, 49000, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, :12] = 0
    press, budget = press_of("snapkv"), Budget(compression_ratio=0.5)
    batch = generate(tiny_model.model, ids, 12, attention_mask=mask, press=press, budget=budget)
    assert batch.path == "native"
    for row, start in ((0, 0), (1, 12)):
        alone = generate(tiny_model.model, ids[row : row + 1, start:], 12, press=press, budget=budget)
        assert torch.equal(batch.tokens[row], alone.tokens[0])


def test_a_ring_streams_past_the_model_context(tiny_model, prompt, monkeypatch):
    """Positions past max_position_embeddings are computed as the HF model computes them (RoPE tables
    extended), so a bounded ring may generate there; a full cache may not."""
    model = tiny_model.model
    monkeypatch.setattr(model.config, "max_position_embeddings", 48)
    press, budget = press_of("streaming_llm", True), Budget(max_cache_tokens=16)
    native = generate(model, prompt, 30, press=press, budget=budget)
    hf = generate(model, prompt, 30, press=press, budget=budget, path="hf")
    assert native.path == "native" and torch.equal(native.tokens, hf.tokens)
