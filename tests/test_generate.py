import pytest
import torch

from kvlab.cache import PreallocatedCache
from kvlab.errors import ConfigError, PromptTooLongError
from kvlab.generate import generate
from kvlab.sampling import SamplingConfig


def hf_greedy(model, input_ids, n, **kwargs):
    out = model.generate(input_ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kwargs)
    return out[:, input_ids.shape[1] :]


PATHS = ["native", "hf"]  # the engine-native twin over a static buffer; the HF modules over a Cache


@pytest.mark.parametrize("path", PATHS)
def test_greedy_equals_hf_generate(tiny_model, prompt_ids, path):
    result = generate(tiny_model.model, prompt_ids, 20, path=path)
    assert result.path == path
    assert torch.equal(result.tokens, hf_greedy(tiny_model.model, prompt_ids, 20))
    assert len(result.token_times) == 20 and result.ttft > 0


@pytest.mark.parametrize("path", PATHS)
def test_left_padded_batch_equals_hf_generate(tiny_model, path):
    torch.manual_seed(1)
    ids = torch.randint(10, 49000, (3, 16))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :11] = 0
    ids[mask == 0] = 2
    result = generate(tiny_model.model, ids, 12, attention_mask=mask, path=path)
    expected = hf_greedy(tiny_model.model, ids, 12, attention_mask=mask, pad_token_id=2)
    assert torch.equal(result.tokens, expected)


def test_auto_path_runs_the_native_twin_without_a_cache_and_hf_with_one(tiny_model, prompt_ids):
    model = tiny_model.model
    assert generate(model, prompt_ids, 3).path == "native"
    cache = PreallocatedCache(model.config.num_hidden_layers, 24 + 3 - 1)
    assert generate(model, prompt_ids, 3, cache=cache).path == "hf"


def test_native_path_refuses_a_cache_and_unknown_paths_are_errors(tiny_model, prompt_ids):
    cache = PreallocatedCache(tiny_model.model.config.num_hidden_layers, 30)
    with pytest.raises(ConfigError, match="static K/V buffer"):
        generate(tiny_model.model, prompt_ids, 3, cache=cache, path="native")
    with pytest.raises(ConfigError, match="unknown forward path"):
        generate(tiny_model.model, prompt_ids, 3, path="fast")


@pytest.mark.parametrize("path", PATHS)
def test_cache_holds_exactly_prompt_plus_output(tiny_model, prompt_ids, path):
    config = tiny_model.model.config
    result = generate(tiny_model.model, prompt_ids, 8, path=path)
    head_dim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    kv_heads = getattr(config, "num_key_value_heads", config.num_attention_heads)
    expected = 2 * config.num_hidden_layers * prompt_ids.shape[0] * kv_heads * (24 + 8 - 1) * head_dim * 4
    assert result.cache_bytes == expected


def test_seeded_sampling_is_reproducible(tiny_model, prompt_ids):
    sampling = SamplingConfig(temperature=0.8, top_k=50, top_p=0.9, seed=7)
    a = generate(tiny_model.model, prompt_ids, 10, sampling=sampling).tokens
    b = generate(tiny_model.model, prompt_ids, 10, sampling=sampling).tokens
    assert torch.equal(a, b)


def test_stream_callback_sees_every_token(tiny_model, prompt_ids):
    seen = []
    result = generate(tiny_model.model, prompt_ids[:1], 6, on_token=lambda t: seen.append(int(t[0])))
    assert seen == result.tokens[0].tolist()


@pytest.mark.parametrize("path", PATHS)
def test_a_prompt_of_the_whole_context_gets_one_token_as_from_hf(tiny_model, path):
    # The last token sampled is never fed back: the context bounds prompt + new tokens - 1.
    context = tiny_model.context_length
    ids = torch.randint(10, 49000, (1, context), generator=torch.Generator().manual_seed(2))
    result = generate(tiny_model.model, ids, 1, path=path)
    assert torch.equal(result.tokens, hf_greedy(tiny_model.model, ids, 1))
    with pytest.raises(PromptTooLongError):
        generate(tiny_model.model, ids, 2, path=path)
    with pytest.raises(PromptTooLongError):
        generate(tiny_model.model, torch.zeros(1, context + 1, dtype=torch.long), 1, path=path)


@pytest.mark.parametrize("max_new_tokens", [0, -3, 4.0, True, "8"])
def test_bad_lengths_are_rejected(tiny_model, prompt_ids, max_new_tokens):
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate(tiny_model.model, prompt_ids, max_new_tokens)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "mask, message",
    [
        (torch.ones(2, 23, dtype=torch.long), "shape"),
        (torch.ones(1, 24, dtype=torch.long), "shape"),
        (torch.full((2, 24), 2), "only 0"),
        (torch.cat([torch.ones(2, 20), torch.zeros(2, 4)], dim=1).long(), "left padding"),
        (torch.stack([torch.ones(24), torch.zeros(24)]).long(), "at least one token"),
    ],
    ids=["short", "one-row", "twos", "right-padding", "empty-row"],
)
def test_a_bad_attention_mask_is_refused_before_any_forward(tiny_model, prompt_ids, path, mask, message):
    # Each of these ran on one path or the other: dropping tokens silently, or failing deep inside.
    with pytest.raises(ConfigError, match=message):
        generate(tiny_model.model, prompt_ids, 3, attention_mask=mask, path=path)


def test_eos_ids_may_be_numpy_or_tensor_integers(tiny_model, prompt_ids):
    import numpy as np

    free = generate(tiny_model.model, prompt_ids[:1], 8).tokens[0].tolist()
    eos = free[3]
    for given in (np.int64(eos), torch.tensor(eos), [np.int64(eos)], torch.tensor([eos])):
        stopped = generate(tiny_model.model, prompt_ids[:1], 8, eos_token_id=given).tokens[0].tolist()
        assert stopped == free[: free.index(eos) + 1]


def test_press_and_budget_must_be_a_press_and_a_budget(tiny_model, prompt_ids):
    from kvlab.press import get_press
    from kvlab.press.budget import Budget

    with pytest.raises(ConfigError, match="press must be a Press"):
        generate(tiny_model.model, prompt_ids, 3, press="knorm", budget=Budget(compression_ratio=0.5))
    with pytest.raises(ConfigError, match="budget must be a Budget"):
        generate(tiny_model.model, prompt_ids, 3, press=get_press("knorm"), budget=10)


def test_a_press_on_the_hf_path_refuses_a_padded_batch(tiny_model, prompt_ids):
    # Its PressCache counts positions and budgets from the first slot, padding included.
    from kvlab.press import get_press
    from kvlab.press.budget import Budget

    mask = torch.ones_like(prompt_ids)
    mask[1, :6] = 0
    with pytest.raises(ConfigError, match="without padding"):
        generate(
            tiny_model.model,
            prompt_ids,
            3,
            attention_mask=mask,
            press=get_press("h2o"),
            budget=Budget(compression_ratio=0.5),
        )


def test_generation_runs_without_autograd(tiny_model, prompt_ids):
    # Every step's activations would otherwise be kept for a backward pass that never comes.
    modes = []
    generate(
        tiny_model.model, prompt_ids, 3, on_token=lambda _: modes.append(torch.is_inference_mode_enabled())
    )
    assert modes == [True] * 3
